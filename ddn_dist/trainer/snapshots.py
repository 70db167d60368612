"""Inference snapshots and sample grids written from a running DeepSpeed engine."""

from __future__ import annotations

import logging
import os
import shutil

import torch
from deepspeed.utils import safe_get_full_fp32_param

from ddn_dist.model import build_model
from ddn_dist.sampling import save_grid
from ddn_dist.snapshot import save_snapshot

log = logging.getLogger(__name__)


@torch.no_grad()
def full_fp32_state_dict(engine) -> dict[str, torch.Tensor]:
    """Return the full fp32 weights of the engine's module by name. Collective from ZeRO stage 1 up.

    The fp32 master copy is read where DeepSpeed keeps one (ZeRO 1-3, bf16), the working weights
    otherwise (stage 0, fp32). Buffers are included in the dtype the module keeps them in.
    """
    state: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)
        state[name] = (param.data if full is None else full).detach().float().cpu().clone()
    for name, buffer in engine.module.named_buffers():
        state[name] = buffer.detach().cpu().clone()
    return state


def snapshot_name(kimg: float) -> str:
    """Return the file name of the snapshot at `kimg` (whole kimg, zero-padded)."""
    return f"snapshot-{int(round(kimg)):06d}.safetensors"


def write_snapshot(run_dir: str, weights: dict[str, torch.Tensor], model_cfg, meta: dict) -> str:
    """Write `snapshot-<kimg>.safetensors` and copy it to `snapshot-latest.safetensors` (rank 0)."""
    path = os.path.join(run_dir, snapshot_name(meta["kimg"]))
    module = build_model(model_cfg)
    # Keep exactly the tensors the model saves (persistent buffers included, others dropped).
    expected = module.state_dict()
    tensors = {name: weights[name] for name in expected}
    save_snapshot(path, tensors, model_cfg, meta)
    latest = os.path.join(run_dir, "snapshot-latest.safetensors")
    tmp = latest + f".tmp-{os.getpid()}"
    shutil.copyfile(path, tmp)
    os.replace(tmp, latest)
    return path


@torch.no_grad()
def write_sample_grid(run_dir: str, weights: dict[str, torch.Tensor], model_cfg, kimg: float,
                      grid_size: int, seed: int) -> str:
    """Sample grid_size^2 images from fixed seeds with `weights`; write `samples-<kimg>.png`."""
    model = build_model(model_cfg)
    model.load_state_dict({name: weights[name] for name in model.state_dict()})
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    images = model.sample(grid_size * grid_size, generator=generator).image
    path = os.path.join(run_dir, f"samples-{int(round(kimg)):06d}.png")
    save_grid(images, path, columns=grid_size, scale=max(1, 64 // model_cfg.resolution))
    return path
