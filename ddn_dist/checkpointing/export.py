"""Consolidated fp32 weights from a DeepSpeed checkpoint, without a DeepSpeed engine."""

from __future__ import annotations

import glob
import os

import torch


def consolidated_fp32_state_dict(checkpoint_root: str, tag: str) -> dict[str, torch.Tensor]:
    """Return the full fp32 model state dict stored in `<checkpoint_root>/<tag>`.

    ZeRO checkpoints are merged from their per-rank fp32 partitions with DeepSpeed's
    `get_fp32_state_dict_from_zero_checkpoint`. A stage-0 checkpoint stores the whole model in
    `mp_rank_00_model_states.pt`, which is read directly.
    """
    tag_dir = os.path.join(checkpoint_root, tag)
    if not os.path.isdir(tag_dir):
        raise FileNotFoundError(f"checkpoint directory {tag_dir} not found")
    if glob.glob(os.path.join(tag_dir, "*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_root, tag=tag)
        return {name: tensor.float() for name, tensor in state.items()}
    model_file = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    if not os.path.isfile(model_file):
        raise FileNotFoundError(f"{tag_dir} has neither ZeRO optimizer files nor {model_file}")
    saved = torch.load(model_file, map_location="cpu", weights_only=False)
    return {name: tensor.float() for name, tensor in saved["module"].items()}
