"""Inference snapshots and the `ddn info` command."""

import json
import struct

import pytest
import torch

from ddn_dist.cli import main
from ddn_dist.model import ModelConfig, build_model
from ddn_dist.snapshot import load_snapshot, save_snapshot


def small_config():
    return ModelConfig(resolution=4, image_channels=1, max_channels=8, max_k=4, max_blocks=2)


def test_snapshot_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = small_config()
    model = build_model(cfg)
    path = str(tmp_path / "model.safetensors")
    save_snapshot(path, model.state_dict(), cfg, {"kimg": 12.5, "step": 3})

    loaded, meta = load_snapshot(path)
    assert meta == {"kimg": 12.5, "step": 3}
    assert loaded.config == cfg
    assert not loaded.training
    original = model.state_dict()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, original[name]), name
    codes = torch.tensor([[0, 1, 2, 3, 1]])
    assert torch.equal(loaded.decode(codes), model.eval().decode(codes))


def test_snapshot_metadata_is_plain_safetensors(tmp_path):
    cfg = small_config()
    path = tmp_path / "model.safetensors"
    save_snapshot(str(path), build_model(cfg).state_dict(), cfg, {"run": "a"})
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8 : 8 + length])["__metadata__"]
    assert json.loads(metadata["ddn_model_config"])["max_k"] == 4
    assert json.loads(metadata["ddn_meta"]) == {"run": "a"}
    assert not list(tmp_path.glob(".*tmp*"))


def test_snapshot_rejects_foreign_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not written by"):
        load_snapshot(str(path))


def test_info_prints_counts(capsys, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "model:\n  resolution: 4\n  image_channels: 1\n  max_channels: 8\n  max_k: 4\n  max_blocks: 2\n"
    )
    assert main(["info", str(config)]) == 0
    text = capsys.readouterr().out
    parameters = sum(p.numel() for p in build_model(small_config()).parameters())
    assert "layers: 5 (1x1 x 1, 2x2 x 2, 4x4 x 2)" in text
    assert "K per layer: 4 x 5" in text
    assert "latent bits: 10.0" in text
    assert f"parameters: {parameters:,}" in text


def test_info_rejects_unknown_option(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  resolution: 4\n  max_kk: 4\n")
    assert main(["info", str(config)]) == 2
