"""Digits quality figures: the measure separates good, collapsed and blurry generators."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from ddn_dist import cli
from ddn_dist.quality import DigitsQuality, digits_images, digits_quality


class ImageTableModel(torch.nn.Module):
    """A one-layer stand-in generator: code k decodes to the k-th image of a fixed table."""

    def __init__(self, images: np.ndarray):
        super().__init__()
        self.register_buffer("table", torch.as_tensor(images, dtype=torch.float32))
        self.ks = [len(images)]
        self.num_layers = 1
        self.config = SimpleNamespace(image_channels=1, resolution=8)

    def forward(self, codes: torch.Tensor):
        return SimpleNamespace(image=self.table[codes[:, 0]])


def real_split(seed: int = 0):
    images, labels = digits_images()
    return train_test_split(images, labels, test_size=0.25, stratify=labels, random_state=seed)


def test_real_digits_pass():
    _, test_x, _, _ = real_split()
    quality = digits_quality(ImageTableModel(test_x), num_samples=600, measure_psnr=False)
    assert quality.passed
    assert quality.share_ratio > 0.95
    assert sum(quality.class_shares) == pytest.approx(1.0)
    assert min(quality.class_shares) >= 0.04


def test_real_share_matches_independent_fit():
    train_x, test_x, train_y, _ = real_split()
    classifier = LogisticRegression(max_iter=5000).fit(train_x.reshape(len(train_x), -1), train_y)
    probabilities = classifier.predict_proba(test_x.reshape(len(test_x), -1))
    expected = float((probabilities.max(1) > 0.5).mean())
    quality = digits_quality(ImageTableModel(test_x[:10]), num_samples=50, measure_psnr=False)
    assert quality.real_confident_share == pytest.approx(expected)


def test_collapsed_generator_fails_balance():
    _, test_x, _, test_y = real_split()
    ones_and_sevens = test_x[(test_y == 1) | (test_y == 7)]
    quality = digits_quality(ImageTableModel(ones_and_sevens), num_samples=400, measure_psnr=False)
    assert quality.share_ratio > 0.9  # the samples are sharp...
    assert max(quality.class_shares) > 0.25  # ...but only two classes
    assert not quality.passed


def test_blurry_averages_fail_confidence():
    _, test_x, _, _ = real_split()
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, len(test_x), size=(400, 2))
    blurred = (test_x[pairs[:, 0]] + test_x[pairs[:, 1]]) / 2
    quality = digits_quality(ImageTableModel(blurred), num_samples=400, measure_psnr=False)
    assert quality.share_ratio < 0.9
    assert not quality.passed


def test_passed_applies_both_targets():
    balanced = [0.1] * 10
    assert DigitsQuality(100, 0.9, 1.0, balanced).passed
    assert not DigitsQuality(100, 0.89, 1.0, balanced).passed
    assert not DigitsQuality(100, 0.95, 1.0, [0.26] + [0.74 / 9] * 9).passed
    assert not DigitsQuality(100, 0.95, 1.0, [0.03] + [0.97 / 9] * 9).passed
    summary = DigitsQuality(100, 0.9, 1.0, balanced, [10.0, 20.0]).summary()
    assert summary.startswith("digits quality PASS")
    assert "ratio 0.90" in summary
    assert "\n" not in summary


def test_eval_digits_command(trained_digits, capsys, tmp_path):
    status = cli.main(["eval", "digits", trained_digits.snapshot, "--num", "300", "--device",
                       "cpu", "--json", str(tmp_path / "quality.json")])
    printed = capsys.readouterr().out
    assert status in (0, 1)
    assert re.search(r"digits quality (PASS|FAIL): confident share [\d.]+% of 300 samples", printed)
    match = re.search(r"after 1\.\.7 layers: ([\d. ]+)", printed)
    curve = [float(value) for value in match.group(1).split()]
    assert len(curve) == 7
    assert curve[-1] > curve[0] + 5
    assert (tmp_path / "quality.json").exists()
