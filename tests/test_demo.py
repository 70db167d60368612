"""The quick start as a new user runs it: `ddn demo` shards, trains on 2 ranks and meets the targets.

The first test runs the README's demo with its defaults: the digits preset, 2 CPU ranks, ZeRO-2
and the preset's full training length, about three minutes on two cores. It checks the printed
summary against figures recomputed here from the files the demo wrote. The classifier is refitted
with scikit-learn directly, and the shares are counted from its probabilities.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from tests.train_helpers import REPO, train_env

pytestmark = pytest.mark.slow

SUMMARY = re.compile(
    r"training:\s+(?P<kimg>[\d.]+) kimg in (?P<seconds>\d+) s on 2 CPU ranks \(ZeRO-2\), "
    r"last tick (?P<ips>\d+) images/s"
)
QUALITY = re.compile(
    r"digits quality (?P<verdict>PASS|FAIL): confident share (?P<share>[\d.]+)% of (?P<num>\d+) samples "
    r"vs (?P<real>[\d.]+)% of real held-out digits \(ratio (?P<ratio>[\d.]+), target >= 0.9\); "
    r"class shares \[(?P<classes>[\d% ]+)\]"
)


def run_demo(*args: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddn_dist.cli", "demo", *args], cwd=REPO,
                          env=train_env(), capture_output=True, text=True, timeout=timeout)


def refit_classifier():
    """The quality measure's classifier, fitted here from scikit-learn without ddn_dist code."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.round(digits.images * 255.0 / 16.0) / 127.5 - 1  # the 8-bit PNG pixels, in [-1, 1]
    features = pixels.reshape(len(pixels), -1)
    train_x, test_x, train_y, _ = train_test_split(features, digits.target, test_size=0.25,
                                                   stratify=digits.target, random_state=0)
    return LogisticRegression(max_iter=5000).fit(train_x, train_y), test_x


def test_demo_meets_quality_targets(tmp_path):
    out = tmp_path / "demo"
    proc = run_demo("--out", str(out))
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 0, printed[-6000:]

    with open(os.path.join(REPO, "configs", "digits.yaml")) as f:
        preset = yaml.safe_load(f)
    duration_kimg = preset["train"]["duration_kimg"]
    batch = preset["train"]["batch"]

    # Shards of all 1,797 digits, an index written last, a complete checkpoint and the files.
    with open(out / "digits" / "index.json") as f:
        index = json.load(f)
    assert index["dataset"]["num_samples"] == 1797
    assert sum(shard["num_samples"] for shard in index["shards"]) == 1797
    run_dir = out / "run"
    from ddn_dist.checkpoint import CheckpointManager

    assert CheckpointManager(str(run_dir)).latest_tag() is not None
    for name in ("samples.png", "reconstructions.png"):
        assert (out / name).stat().st_size > 0
    with open(run_dir / "stats.jsonl") as f:
        last = [json.loads(line) for line in f][-1]

    summary = SUMMARY.search(printed)
    assert summary, printed[-3000:]
    kimg = float(summary["kimg"])
    assert duration_kimg <= kimg < duration_kimg + batch / 1000 + 0.05
    assert kimg == pytest.approx(last["kimg"], abs=0.05)
    assert int(summary["ips"]) > 0
    assert f"snapshot:        {run_dir / 'snapshot-latest.safetensors'}" in printed

    quality = QUALITY.search(printed)
    assert quality, printed[-3000:]
    num = int(quality["num"])
    assert num == 2000

    # Recompute the figures from the snapshot with the refitted classifier.
    from ddn_dist.sampling import load_model, sample_seeds

    model, _ = load_model(str(run_dir / "snapshot-latest.safetensors"))
    with torch.no_grad():
        images = sample_seeds(model, list(range(num))).images.float()
    classifier, held_out = refit_classifier()
    generated = classifier.predict_proba(images.reshape(num, -1).numpy())
    real_share = (classifier.predict_proba(held_out).max(axis=1) > 0.5).mean()
    share = (generated.max(axis=1) > 0.5).mean()
    class_shares = np.bincount(generated.argmax(axis=1), minlength=10) / num

    assert float(quality["share"]) == pytest.approx(100 * share, abs=0.051)
    assert float(quality["real"]) == pytest.approx(100 * real_share, abs=0.051)
    printed_classes = [int(value.rstrip("%")) for value in quality["classes"].split()]
    assert printed_classes == [round(100 * value) for value in class_shares]

    # The targets: at least 90 % of the real confident share, every class within 4 %-25 %.
    assert share / real_share >= 0.9, (share, real_share)
    assert class_shares.min() >= 0.04, class_shares
    assert class_shares.max() <= 0.25, class_shares
    assert quality["verdict"] == "PASS"


@pytest.mark.ceph
def test_demo_with_s3_shards(tmp_path, s3_env):
    bucket = s3_env.make_bucket("demo")
    data = f"s3://{bucket}/digits"
    out = tmp_path / "demo"
    proc = run_demo("--out", str(out), "--data", data, "--endpoint-url", s3_env.endpoint_url,
                    "--kimg", "1", "--num-samples", "100", "train.tick_kimg=0.5",
                    "train.snapshot_kimg=0.5", "train.checkpoint_kimg=0.5")
    printed = proc.stdout + proc.stderr
    assert proc.returncode == 0, printed[-6000:]

    remote = s3_env.filesystem()
    with remote.open(f"{bucket}/digits/index.json") as f:
        assert json.load(f)["dataset"]["num_samples"] == 1797
    assert not (out / "digits").exists()  # nothing was sharded locally
    summary = SUMMARY.search(printed)
    assert summary and 1.0 <= float(summary["kimg"]) < 1.2, printed[-3000:]
    assert QUALITY.search(printed), printed[-3000:]
    assert (out / "run" / "snapshot-latest.safetensors").exists()

    # The run directory now contains checkpoints of this model, so another model is rejected.
    with open(os.path.join(REPO, "configs", "digits.yaml")) as f:
        preset_k = yaml.safe_load(f)["model"]["max_k"]
    other_k = 2 * preset_k
    proc = run_demo("--out", str(out), "--data", data, "--endpoint-url", s3_env.endpoint_url,
                    "--kimg", "2", f"model.max_k={other_k}")
    assert proc.returncode == 1
    rejection = (f"{out / 'run'} contains checkpoints of a model of another shape "
                 f"(model.max_k {preset_k} -> {other_k})")
    assert rejection in proc.stderr, proc.stderr
    assert "training:" not in proc.stdout


@pytest.mark.parametrize("case", ["other_k", "same_model", "other_chain_dropout", "unparsable",
                                  "no_model_section"])
def test_run_dir_model_check(tmp_path, case):
    from ddn_dist.commands.demo import DEFAULT_CONFIG, check_run_dir_model

    with open(DEFAULT_CONFIG) as f:
        preset = yaml.safe_load(f)["model"]
    other_k = 2 * preset["max_k"]
    saved = {
        "other_k": yaml.safe_dump({"model": {**preset, "max_k": other_k}}),
        "same_model": yaml.safe_dump({"model": preset}),
        "other_chain_dropout": yaml.safe_dump({"model": {**preset, "chain_dropout": 0.5}}),
        "unparsable": "model: [unclosed",
        "no_model_section": yaml.safe_dump({"train": {"batch": 64}}),
    }[case]
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(saved)
    args = argparse.Namespace(config=DEFAULT_CONFIG, overrides=[])

    if case != "other_k":  # same shapes, or left to the trainer's own checkpoint check
        check_run_dir_model(args, str(run_dir))
        return
    with pytest.raises(SystemExit) as raised:
        check_run_dir_model(args, str(run_dir))
    assert f"model.max_k {other_k} -> {preset['max_k']}" in str(raised.value)
    assert f"Delete {run_dir}" in str(raised.value)
