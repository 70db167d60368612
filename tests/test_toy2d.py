"""The 2D toy experiment: density maps, KL measurement and the Split-and-Prune pattern."""

import re

import numpy as np
import pytest
from scipy.stats import entropy, truncnorm

from ddn_dist.cli import main
from ddn_dist.toy2d import DENSITY_NAMES, GRID, kl_divergence, load_density, run_toy2d, sample_density


@pytest.mark.parametrize("name", DENSITY_NAMES)
def test_density_maps_load(name):
    density = load_density(name)
    assert density.shape == (GRID, GRID)
    assert density.sum() == pytest.approx(1.0)
    assert density.min() > 0
    # Every map has structure: its densest cell is far above the uniform level.
    assert density.max() > 1.5 / density.size


def test_kl_matches_scipy_entropy():
    density = load_density("words")
    points = sample_density(density, 700, np.random.default_rng(4))
    assert np.all(np.abs(points) <= 1.0)
    cols = np.clip(((points[:, 0] + 1) / 2 * GRID).astype(int), 0, GRID - 1)
    rows = np.clip(((1 - points[:, 1]) / 2 * GRID).astype(int), 0, GRID - 1)
    counts = np.bincount(rows * GRID + cols, minlength=GRID * GRID).astype(float)
    expected = entropy(counts / counts.sum(), density.ravel())
    assert kl_divergence(points, density) == pytest.approx(expected, rel=1e-9)


def test_samples_follow_density():
    density = load_density("gaussian")
    points = sample_density(density, 20000, np.random.default_rng(0))
    # The map is exp(-(x^2 + y^2) / 0.3) on [-1, 1]^2: per axis a normal with variance 0.15
    # truncated to [-1, 1].
    sigma = 0.15**0.5
    expected_variance = truncnorm(-1 / sigma, 1 / sigma, scale=sigma).var()
    assert np.abs(points.mean(axis=0)).max() < 0.02
    assert points[:, 0].var() == pytest.approx(expected_variance, rel=0.04)
    assert points[:, 1].var() == pytest.approx(expected_variance, rel=0.04)


def test_split_prune_beats_plain_training():
    with_split = run_toy2d("words", k=500, batch=40, iterations=500, seed=0)
    without = run_toy2d("words", k=500, batch=40, iterations=500, split_prune=False, seed=0)
    assert with_split.real_kl == pytest.approx(without.real_kl)
    assert with_split.splits > 0
    assert without.splits == 0
    assert with_split.kl < 0.9 * with_split.real_kl
    assert without.kl > 5.0 * without.real_kl


def test_cli_prints_kl_line_and_plot(tmp_path, capsys):
    plot = tmp_path / "toy.png"
    status = main(
        ["toy2d", "--density", "gaussian", "--k", "50", "--batch", "10", "--iters", "20",
         "--plot", str(plot), "--seed", "1"]
    )
    assert status == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"kl=\d+\.\d+ real_kl=\d+\.\d+", last), last
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_density_is_rejected():
    with pytest.raises(ValueError, match="valid names are"):
        load_density("moon")
