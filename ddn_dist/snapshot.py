"""Inference snapshots: one safetensors file holding the weights, the model config and metadata.

The safetensors header metadata (string to string) stores the ModelConfig as JSON under
"ddn_model_config" and the caller's metadata as JSON under "ddn_meta", so a snapshot can be
loaded with nothing but torch and safetensors. Paths may be local or any fsspec URL (s3://).
"""

from __future__ import annotations

import json
import struct
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from ddn_dist.model import DDN, ModelConfig, build_model
from ddn_dist.storage import read_bytes, write_bytes_atomic

CONFIG_KEY = "ddn_model_config"
META_KEY = "ddn_meta"


def save_snapshot(
    path: str,
    state_dict: dict[str, torch.Tensor],
    cfg: ModelConfig,
    meta: dict[str, Any] | None = None,
    endpoint_url: str | None = None,
) -> None:
    """Write the weights with the config and JSON-serialisable `meta` atomically to `path`."""
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()}
    metadata = {CONFIG_KEY: json.dumps(cfg.to_dict(), sort_keys=True), META_KEY: json.dumps(meta or {})}
    write_bytes_atomic(path, save_safetensors(tensors, metadata=metadata), endpoint_url)


def read_snapshot_metadata(data: bytes, path: str = "snapshot") -> dict[str, str]:
    """Return the string metadata from the header of safetensors bytes."""
    if len(data) < 8:
        raise ValueError(f"{path} is not a safetensors file: {len(data)} bytes is shorter than its header")
    (header_length,) = struct.unpack("<Q", data[:8])
    if header_length > len(data) - 8:
        raise ValueError(f"{path} is truncated: its header claims {header_length} bytes")
    try:
        header = json.loads(data[8 : 8 + header_length])
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is not a safetensors file: its header is not valid JSON ({error})") from error
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file: its header is not a JSON object")
    return header.get("__metadata__", {}) or {}


def load_snapshot(
    path: str, device: str | torch.device = "cpu", endpoint_url: str | None = None
) -> tuple[DDN, dict[str, Any]]:
    """Load a snapshot written by `save_snapshot`; returns the model in eval mode and the meta."""
    data = read_bytes(path, endpoint_url)
    metadata = read_snapshot_metadata(data, path)
    if CONFIG_KEY not in metadata:
        raise ValueError(
            f"{path} has no {CONFIG_KEY!r} metadata; it was not written by ddn_dist.snapshot.save_snapshot"
        )
    try:
        cfg = ModelConfig.from_dict(json.loads(metadata[CONFIG_KEY]))
        meta = json.loads(metadata.get(META_KEY, "{}"))
    except ValueError as error:  # JSONDecodeError or an invalid model option
        raise ValueError(
            f"{path} has invalid {CONFIG_KEY!r} or {META_KEY!r} metadata: {error}") from error
    model = build_model(cfg)
    try:
        model.load_state_dict(load_safetensors(data))
    except RuntimeError as error:  # missing, unexpected or mis-shaped tensors
        message = " ".join(str(error).split())
        raise ValueError(f"{path} does not match the model in its own metadata: {message}") from error
    return model.to(device).eval(), meta
