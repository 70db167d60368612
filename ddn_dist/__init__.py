"""Distributed training of Discrete Distribution Networks (DDN)."""

__version__ = "0.1.0"
