"""The distributed DDN trainer: DeepSpeed engine setup, the training loop and its outputs.

The entry point is `python -m ddn_dist.train`; `ddn_dist.trainer.preemption` documents its exit codes.
"""
