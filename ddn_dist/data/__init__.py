"""Shard index, data preparation and the streaming loader."""
