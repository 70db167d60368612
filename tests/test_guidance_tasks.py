"""Zero-shot guided generation: each task lowers its own condition error; ranks, top-k, plugins."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.stats import rankdata

from ddn_dist import cli, guidance, sampling

NUM_INPUTS = 8
PER_INPUT = 3


@pytest.fixture(scope="module")
def setup(trained_digits):
    """Clean digits (8 inputs, each repeated 3 times), unguided samples of the same batch size."""
    clean = trained_digits.images[100:100 + NUM_INPUTS].repeat_interleave(PER_INPUT, 0)
    unguided = sampling.sample_seeds(trained_digits.model, list(range(len(clean)))).images
    return trained_digits.model, clean, unguided


def generate(model, scorers, num, top_k=1, seed=0):
    selector = guidance.GuidedSelector(scorers, top_k=top_k,
                                       generator=torch.Generator().manual_seed(seed))
    return guidance.guided_generate(model, selector, num), selector


def left_half_mask() -> torch.Tensor:
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    return mask


def sr_error(images, clean):
    return (F.avg_pool2d(images, 2) - F.avg_pool2d(clean, 2)).square().mean().item()


def colorize_error(images, clean):
    return (images.mean(1) - clean.mean(1)).square().mean().item()


def inpaint_error(images, clean):
    mask = left_half_mask()
    return (((images - clean) ** 2) * mask).sum().item() / (mask.sum().item() * len(images))


def denoise_error(images, clean):
    # Distance to the clean image, which the scorer never gets (it scores against the noisy one).
    return (images - clean).square().mean().item()


def lowbit_error(images, clean):
    # MSE between the 2-bit versions (levels 0..3) of the samples and of the clean images.
    levels = 3
    target = torch.round((clean + 1) / 2 * levels)
    got = torch.round((images.clamp(-1, 1) + 1) / 2 * levels)
    return (got - target).square().mean().item()


CASES = {
    "sr": sr_error,
    "colorize": colorize_error,
    "inpaint": inpaint_error,
    "denoise": denoise_error,
    "lowbit": lowbit_error,
}


@pytest.mark.parametrize("task", list(CASES))
def test_task_lowers_condition_error(setup, task):
    model, clean, unguided = setup
    mask = left_half_mask() if task == "inpaint" else None
    settings = guidance.Degradation(scale=2, bits=2, noise_std=0.3, seed=1)
    condition = guidance.degrade(task, clean, mask, settings)
    scorer = guidance.build_scorer(task, condition)
    samples, _ = generate(model, [(scorer, 1.0)], len(clean))
    error = CASES[task]
    assert error(samples, clean) < 0.6 * error(unguided, clean)


def test_sr_observation_is_area_downsample(setup):
    _, clean, _ = setup
    condition = guidance.degrade("sr", clean, None, guidance.Degradation(scale=2))
    assert torch.allclose(condition.image, F.avg_pool2d(clean, 2), atol=1e-6)


def test_combined_tasks_lower_both_errors(setup):
    model, clean, unguided = setup
    settings = guidance.Degradation(scale=4)
    sr = guidance.build_scorer("sr", guidance.degrade("sr", clean, None, settings))
    inpaint = guidance.build_scorer(
        "inpaint", guidance.degrade("inpaint", clean, left_half_mask(), settings))
    samples, _ = generate(model, [(sr, 1.0), (inpaint, 1.0)], len(clean))
    coarse = (F.avg_pool2d(samples, 4) - F.avg_pool2d(clean, 4)).square().mean().item()
    coarse_unguided = (F.avg_pool2d(unguided, 4) - F.avg_pool2d(clean, 4)).square().mean().item()
    assert coarse < coarse_unguided
    assert inpaint_error(samples, clean) < inpaint_error(unguided, clean)


class FixedScores:
    """A scorer returning given (B, K) scores at every layer."""

    def __init__(self, scores: torch.Tensor):
        self.scores = scores

    def score(self, candidates, layer):
        return self.scores


def test_weighted_ranks_pick_min_sum():
    generator = torch.Generator().manual_seed(3)
    first = torch.rand(5, 16, generator=generator)
    second = torch.rand(5, 16, generator=generator)
    candidates = torch.zeros(5, 16, 1, 2, 2)
    selector = guidance.GuidedSelector([(FixedScores(first), 1.0), (FixedScores(second), 3.0)])
    chosen = selector(0, candidates)
    expected = np.argmin(rankdata(first.numpy(), axis=1) + 3 * rankdata(second.numpy(), axis=1),
                         axis=1)
    assert chosen.tolist() == expected.tolist()

    only_second = guidance.GuidedSelector([(FixedScores(first), 0.0), (FixedScores(second), 1.0)])
    assert only_second(0, candidates).tolist() == second.argmin(1).tolist()


def test_top_k_chooses_among_best():
    scores = torch.arange(10.0).repeat(400, 1)  # candidate 0 best, 1 second, ...
    selector = guidance.GuidedSelector([(FixedScores(scores), 1.0)], top_k=3,
                                       generator=torch.Generator().manual_seed(0))
    chosen = selector(0, torch.zeros(400, 10, 1, 1, 1))
    assert set(chosen.tolist()) == {0, 1, 2}
    counts = torch.bincount(chosen, minlength=3).float() / 400
    assert bool((counts > 0.25).all())


def test_top_k_gives_diverse_samples(setup):
    model, clean, unguided = setup
    condition = guidance.degrade("sr", clean, None, guidance.Degradation(scale=2))
    scorer = guidance.build_scorer("sr", condition)
    best, _ = generate(model, [(scorer, 1.0)], len(clean), top_k=1)
    varied, selector = generate(model, [(scorer, 1.0)], len(clean), top_k=2, seed=5)
    codes = torch.stack(selector.chosen, dim=1).view(NUM_INPUTS, PER_INPUT, -1)
    distinct = sum(len({tuple(c) for c in group.tolist()}) for group in codes)
    assert distinct > NUM_INPUTS  # some input got more than one distinct sample
    same_input = best.view(NUM_INPUTS, PER_INPUT, -1)
    assert torch.allclose(same_input[:, 0], same_input[:, 1], atol=1e-5)
    assert sr_error(varied, clean) < sr_error(unguided, clean)


def test_unknown_task_names_valid_ones():
    with pytest.raises(ValueError, match="valid tasks: colorize, denoise, inpaint, lowbit, sr"):
        guidance.build_scorer("blur", guidance.GuideCondition(torch.zeros(1, 1, 8, 8)))


PLUGIN = '''
import torch
from ddn_dist.guidance import register_scorer


class MeanBrightness:
    """Prefers candidates whose mean pixel matches the condition image's mean."""

    def __init__(self, image):
        self.target = image.mean(dim=(1, 2, 3))

    def score(self, candidates, layer):
        means = candidates.mean(dim=(2, 3, 4))
        return (means - self.target[:, None].to(means)) ** 2


register_scorer("brightness", lambda condition: MeanBrightness(condition.image))
'''


def test_guide_command_with_plugin_scorer(trained_digits, tmp_path, capsys):
    plugin = tmp_path / "brightness_plugin.py"
    plugin.write_text(PLUGIN)
    target = tmp_path / "bright.png"
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(target)
    out = tmp_path / "guided.png"
    assert cli.main(["guide", trained_digits.snapshot, "--task", "brightness", "--plugin",
                     str(plugin), "--input", str(target), "--num", "6", "--top-k", "1",
                     "--out", str(out), "--images-dir", str(tmp_path / "s"),
                     "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    guided, unguided = (float(v) for v in re.search(
        r"brightness: condition error ([\d.]+) guided vs ([\d.]+) unguided", printed).groups())
    assert guided < unguided
    # Independent check on the written samples: their mean pixel is nearer 200 than unguided ones.
    means = [np.asarray(Image.open(tmp_path / "s" / f"input000_sample{i:03d}.png")).mean()
             for i in range(6)]
    unguided = sampling.to_uint8(sampling.sample_seeds(trained_digits.model, list(range(6))).images)
    assert abs(np.mean(means) - 200) < 0.8 * abs(unguided.mean() - 200)
    with Image.open(out) as grid:
        assert grid.size == (7 * 9 + 1, 9 + 1)


def test_guide_command_sr_degrade(trained_digits, tmp_path, capsys):
    clean = tmp_path / "clean.png"
    sampling.save_png(sampling.to_uint8(trained_digits.images[5:6])[0], str(clean))
    assert cli.main(["guide", trained_digits.snapshot, "--task", "sr", "--task", "lowbit:0.5",
                     "--input", str(clean), "--degrade", "--num", "4", "--out",
                     str(tmp_path / "sr.png"), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    for task in ("sr", "lowbit"):
        guided, unguided = (float(v) for v in re.search(
            rf"{task}: condition error ([\d.]+) guided vs ([\d.]+) unguided", printed).groups())
        assert guided < unguided
    with Image.open(tmp_path / "sr.png") as grid:
        assert grid.size == (6 * 9 + 1, 9 + 1)


def test_inpaint_without_mask_is_rejected(trained_digits, tmp_path, capsys):
    clean = tmp_path / "clean.png"
    sampling.save_png(sampling.to_uint8(trained_digits.images[:1])[0], str(clean))
    status = cli.main(["guide", trained_digits.snapshot, "--task", "inpaint", "--input", str(clean),
                       "--out", str(tmp_path / "x.png"), "--device", "cpu"])
    assert status == 1
    assert "--mask" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
