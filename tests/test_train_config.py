"""Training config: YAML + overrides, validation messages, batch arithmetic, DeepSpeed config."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ddn_dist.config import ConfigError, load_config, model_config
from ddn_dist.trainer.engine import build_ds_config
from ddn_dist.trainer.schedule import Interval, ema_beta, learning_rate
from tests.train_helpers import REPO

PRESETS = ["digits", "cifar10", "ffhq64"]


@pytest.mark.parametrize("name", PRESETS)
def test_presets_load(name):
    cfg = load_config(os.path.join(REPO, "configs", f"{name}.yaml"))
    model_config(cfg)
    micro, accum = cfg.resolve_batch(2)
    assert micro * accum * 2 == cfg.train.batch


def test_digits_preset_is_zero2_on_two_ranks():
    cfg = load_config(os.path.join(REPO, "configs", "digits.yaml"))
    assert cfg.deepspeed.stage == 2
    assert cfg.train.lr_warmup_kimg < cfg.train.duration_kimg


def test_override_sets_typed_values(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {data: /nowhere}\n")
    cfg = load_config(path, ["train.lr=5e-4", "deepspeed.stage=3", "train.betas=[0.5, 0.9]",
                             "data.audit_dir=/tmp/audit", "train.duration_kimg=12"])
    assert cfg.train.lr == 5e-4
    assert cfg.deepspeed.stage == 3
    assert cfg.train.betas == [0.5, 0.9]
    assert cfg.data.audit_dir == "/tmp/audit"
    assert isinstance(cfg.train.duration_kimg, float)


@pytest.mark.parametrize("override, fragment", [
    ("train.bogus=1", "valid keys of train: run_dir, batch"),
    ("bogus.key=1", "valid sections: model, data, train"),
    ("deepspeed.precision=fp8", "valid choices: fp32, bf16, fp16"),
    ("deepspeed.stage=4", "valid choices: 0, 1, 2, 3"),
    ("data.remainder=keep", "valid choices: drop, pad"),
    ("train.lr=fast", "train.lr must be a number"),
    ("train.batch=2.5", "train.batch must be an integer"),
    ("train.batch=0", "it must be > 0"),
    ("metrics.enabled=maybe", "metrics.enabled must be true or false"),
    ("train.lr", "write section.key=value"),
])
def test_bad_values_are_named(tmp_path, override, fragment):
    path = tmp_path / "c.yaml"
    path.write_text("data: {data: /nowhere}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path, [override])
    assert fragment in str(error.value)


def test_fp16_at_stage0_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {data: /nowhere}\n")
    with pytest.raises(ConfigError, match="use bf16 or fp32"):
        load_config(path, ["deepspeed.precision=fp16", "deepspeed.stage=0"])


def test_missing_data_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {batch: 64}\n")
    with pytest.raises(ConfigError, match="data.data is missing"):
        load_config(path)


def test_bad_model_option_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {data: /nowhere}\nmodel: {max_kk: 3}\n")
    cfg = load_config(path)
    with pytest.raises(ConfigError, match="max_kk"):
        model_config(cfg)


def test_batch_split_over_ranks(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {data: /nowhere}\ntrain: {batch: 96}\ndeepspeed: {micro_batch: 8}\n")
    cfg = load_config(path)
    assert cfg.resolve_batch(1) == (8, 12)
    assert cfg.resolve_batch(3) == (8, 4)
    with pytest.raises(ConfigError, match="not a multiple of deepspeed.micro_batch"):
        cfg.resolve_batch(5)


def test_explicit_accumulation_must_multiply_out(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {data: /nowhere}\ntrain: {batch: 96}\n"
                    "deepspeed: {micro_batch: 8, grad_accum: 4}\n")
    cfg = load_config(path)
    assert cfg.resolve_batch(3) == (8, 4)
    with pytest.raises(ConfigError, match="must equal deepspeed.micro_batch"):
        cfg.resolve_batch(2)


def test_config_hash_tracks_training_settings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {data: /nowhere}\n")
    base = load_config(path).config_hash()
    assert load_config(path, ["train.run_dir=/elsewhere"]).config_hash() == base
    assert load_config(path, ["deepspeed.micro_batch=8"]).config_hash() == base
    assert load_config(path, ["train.lr=0.002"]).config_hash() != base
    assert load_config(path, ["model.max_k=16"]).config_hash() != base


def test_deepspeed_config_generated(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {data: /nowhere}\ntrain: {batch: 64, lr: 0.003}\n"
                    "deepspeed: {stage: 3, precision: bf16, micro_batch: 8}\n")
    ds = build_ds_config(load_config(path), world_size=2)
    assert ds["train_batch_size"] == 64
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"]["enabled"] is True
    assert ds["optimizer"]["params"]["lr"] == 0.003
    assert ds["optimizer"]["params"]["weight_decay"] == 0.0
    assert ds["gradient_clipping"] == 0.0


def test_deepspeed_file_is_completed_and_checked(tmp_path):
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({"zero_optimization": {"stage": 1, "overlap_comm": True},
                                   "train_micro_batch_size_per_gpu": "auto"}))
    path = tmp_path / "c.yaml"
    path.write_text(f"data: {{data: /nowhere}}\ntrain: {{batch: 32}}\n"
                    f"deepspeed: {{micro_batch: 16, config_file: {ds_file}}}\n")
    ds = build_ds_config(load_config(path), world_size=2)
    assert ds["zero_optimization"] == {"stage": 1, "overlap_comm": True}
    assert ds["train_micro_batch_size_per_gpu"] == 16
    ds_file.write_text(json.dumps({"train_batch_size": 100}))
    with pytest.raises(ConfigError, match="train_batch_size=100"):
        build_ds_config(load_config(path), world_size=2)


def test_entry_point_rejects_before_data(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"data: {{data: {tmp_path / 'missing'}}}\n")
    proc = subprocess.run([sys.executable, "-m", "ddn_dist.train", "--config", str(path),
                           "train.batch=7", "deepspeed.micro_batch=2"],
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "WORLD_SIZE": "2", "RANK": "0"})
    assert proc.returncode == 2, proc.stderr
    assert "train.batch=7 is not a multiple" in proc.stderr
    assert not (tmp_path / "missing").exists()


def test_learning_rate_warmup():
    assert learning_rate(0, 1e-3, 10.0) == 0.0
    assert learning_rate(5000, 1e-3, 10.0) == pytest.approx(5e-4)
    assert learning_rate(20000, 1e-3, 10.0) == 1e-3
    assert learning_rate(1, 1e-3, 0.0) == 1e-3


def test_ema_halflife():
    beta = ema_beta(500, 1.0)
    # Two steps of 500 images are one half-life of 1 kimg.
    assert beta * beta == pytest.approx(0.5)
    assert ema_beta(500, 0.0) == 0.0


def test_interval_fires_on_kimg_multiples():
    interval = Interval(kimg=1.0)
    assert not interval.due(0, 960, now=interval.last_time)
    assert interval.due(960, 1024, now=interval.last_time)
    assert not interval.due(1024, 1088, now=interval.last_time)


def test_interval_fires_on_minutes():
    interval = Interval(kimg=0.0, minutes=2.0)
    assert not interval.due(0, 10, now=interval.last_time + 60)
    assert interval.due(0, 10, now=interval.last_time + 121)
