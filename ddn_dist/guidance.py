"""Zero-shot conditional generation: steer a trained DDN by changing only its selection rule.

At every layer the model hands the K candidates (B, K, C, h, w) to a selector, which scores them
against a condition and returns one index per sample. A scorer returns (B, K) scores where lower is
better (a distance, or a rank). Several scorers combine by summing their weighted ranks over the
K candidates, and `top_k` > 1 picks uniformly at random among the best `top_k` for diversity.

Built-in scorers (all compare at the candidates' resolution h x w, so coarse layers are guided too):
- `sr`: super-resolution. Candidates are area-downsampled to the low-resolution input's size and
  compared by MSE. At layers coarser than the input, the input is downsampled instead.
- `colorize`: the grayscale (channel mean) of each candidate against the grayscale input.
- `inpaint`: MSE over the known pixels only (mask 1 = known), weighted by the area-resized mask.
- `denoise`: MSE against the noisy input; the DDN's candidates cannot express pixel noise, so the
  nearest candidate is a clean image close to it.
- `lowbit`: distance outside the quantisation bin: a candidate pixel within half a step of the
  quantised input value costs nothing.

A new scorer needs no change to the model: call `register_scorer("name", factory)`, where
`factory(condition: GuideCondition) -> Scorer`, and pass `--task name` (with `--plugin MODULE`
to import the module that registers it) to `ddn guide`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn.functional as F


class Scorer(Protocol):
    """Scores the K candidates of one layer against a condition."""

    def score(self, candidates: torch.Tensor, layer: int) -> torch.Tensor:
        """Return (B, K) scores (lower is better) of candidates (B, K, C, h, w) of a layer."""
        ...


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize (N, C, H, W) images: area averaging to shrink, bilinear to enlarge."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    if size[0] <= images.shape[-2] and size[1] <= images.shape[-1]:
        return F.interpolate(images, size=size, mode="area")
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


def _flatten(candidates: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    batch, k = candidates.shape[:2]
    return candidates.reshape(batch * k, *candidates.shape[2:]), batch, k


def _expand(condition: torch.Tensor, batch: int, k: int) -> torch.Tensor:
    """Broadcast a (1 or B, C, h, w) condition to (B*K, C, h, w), matching flattened candidates."""
    if condition.shape[0] not in (1, batch):
        raise ValueError(
            f"the condition has {condition.shape[0]} images but the batch has {batch} samples; "
            f"pass one condition image or one per sample"
        )
    condition = condition.expand(batch, *condition.shape[1:])
    return condition.repeat_interleave(k, dim=0)


def _mean_per_row(values: torch.Tensor, batch: int, k: int) -> torch.Tensor:
    return values.reshape(batch, k, -1).mean(dim=2)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """Return the channel mean of (N, C, H, W) images as (N, 1, H, W)."""
    return images.mean(dim=1, keepdim=True)


def quantise(images: torch.Tensor, bits: int) -> torch.Tensor:
    """Round images in [-1, 1] to 2**bits evenly spaced levels in [-1, 1]."""
    levels = 2**bits - 1
    return (((images.clamp(-1, 1) + 1) / 2 * levels).round() / levels) * 2 - 1


@dataclass
class SuperResolution:
    """Scores candidates against a low-resolution image (1 or B, C, r, r) in [-1, 1]."""

    low_res: torch.Tensor

    def score(self, candidates: torch.Tensor, layer: int) -> torch.Tensor:
        flat, batch, k = _flatten(candidates)
        low_res = self.low_res.to(flat)
        if flat.shape[-1] >= low_res.shape[-1]:
            flat = resize(flat, tuple(low_res.shape[-2:]))
        else:
            low_res = resize(low_res, tuple(flat.shape[-2:]))
        return _mean_per_row((flat - _expand(low_res, batch, k)) ** 2, batch, k)


@dataclass
class Colorize:
    """Scores candidates by how well their grayscale matches a grayscale image (1 or B, 1, H, W)."""

    gray: torch.Tensor

    def score(self, candidates: torch.Tensor, layer: int) -> torch.Tensor:
        flat, batch, k = _flatten(candidates)
        target = resize(grayscale(self.gray.to(flat)), tuple(flat.shape[-2:]))
        return _mean_per_row((grayscale(flat) - _expand(target, batch, k)) ** 2, batch, k)


@dataclass
class Inpaint:
    """Scores candidates by MSE on the known pixels, where `mask` (1 or B, 1, H, W) is 1."""

    image: torch.Tensor
    mask: torch.Tensor

    def score(self, candidates: torch.Tensor, layer: int) -> torch.Tensor:
        flat, batch, k = _flatten(candidates)
        size = tuple(flat.shape[-2:])
        mask = self.mask.to(flat)
        weight = resize(mask, size)
        # Area-resizing image*mask and dividing by the resized mask averages known pixels only.
        known = resize(self.image.to(flat) * mask, size) / weight.clamp_min(1e-6)
        weight = _expand(weight, batch, k).expand_as(flat)
        error = weight * (flat - _expand(known, batch, k)) ** 2
        total = weight.reshape(batch, k, -1).sum(dim=2)
        return error.reshape(batch, k, -1).sum(dim=2) / total.clamp_min(1e-6)


@dataclass
class Denoise:
    """Scores candidates by MSE against a noisy image (1 or B, C, H, W)."""

    noisy: torch.Tensor

    def score(self, candidates: torch.Tensor, layer: int) -> torch.Tensor:
        flat, batch, k = _flatten(candidates)
        target = resize(self.noisy.to(flat), tuple(flat.shape[-2:]))
        return _mean_per_row((flat - _expand(target, batch, k)) ** 2, batch, k)


@dataclass
class LowBit:
    """Scores candidates against an image quantised to `bits` per channel: error outside its bin."""

    quantised: torch.Tensor
    bits: int

    def score(self, candidates: torch.Tensor, layer: int) -> torch.Tensor:
        flat, batch, k = _flatten(candidates)
        target = resize(self.quantised.to(flat), tuple(flat.shape[-2:]))
        half_step = 1.0 / (2**self.bits - 1)
        outside = (flat - _expand(target, batch, k)).abs() - half_step
        return _mean_per_row(outside.clamp_min(0) ** 2, batch, k)


def ranks(scores: torch.Tensor) -> torch.Tensor:
    """Return the rank (0 = best) of each of the K scores per row of (B, K) scores, as float."""
    return scores.argsort(dim=1).argsort(dim=1).to(torch.float32)


@dataclass
class GuidedSelector:
    """A selection rule for `model(select_fn=..., num=B)` built from weighted scorers.

    With one scorer the raw scores decide; with several, the weighted sum of ranks decides. Among
    the `top_k` best candidates one is chosen uniformly at random with `generator`.
    """

    scorers: list[tuple[Scorer, float]]
    top_k: int = 1
    generator: torch.Generator | None = None
    chosen: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.scorers:
            raise ValueError("a guided selector needs at least one scorer")
        if self.top_k < 1:
            raise ValueError(f"invalid top_k {self.top_k}; pass 1 (best only) or more")

    def __call__(self, layer: int, candidates: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            combined = self.combined_scores(layer, candidates)
            top_k = min(self.top_k, combined.shape[1])
            best = combined.topk(top_k, dim=1, largest=False).indices  # (B, top_k)
            if top_k == 1:
                choice = best[:, 0]
            else:
                pick = torch.randint(top_k, (best.shape[0],), generator=self.generator)
                choice = best.gather(1, pick.to(best.device)[:, None])[:, 0]
        self.chosen.append(choice.detach().cpu())
        return choice

    def combined_scores(self, layer: int, candidates: torch.Tensor) -> torch.Tensor:
        """Return the (B, K) scores that decide the selection, lower is better."""
        if len(self.scorers) == 1:
            scorer, _ = self.scorers[0]
            return scorer.score(candidates, layer).float()
        total = None
        for scorer, weight in self.scorers:
            term = weight * ranks(scorer.score(candidates, layer))
            total = term if total is None else total + term
        return total


def guided_generate(model, selector: GuidedSelector, num: int) -> torch.Tensor:
    """Generate `num` images (num, C, H, W) on CPU; `selector` picks every layer's candidate."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(select_fn=selector, num=num)
    finally:
        model.train(was_training)
    return output.image.float().cpu()


@dataclass
class GuideCondition:
    """Input of a scorer factory: the observation (1 or B, C, H, W) in [-1, 1] and task options.

    `image` is the degraded observation: the low-resolution image for `sr`, the grayscale image
    for `colorize`, the image with unknown pixels for `inpaint` (with `mask`, 1 = known), the
    noisy image for `denoise`, the quantised image for `lowbit`.
    """

    image: torch.Tensor
    mask: torch.Tensor | None = None
    bits: int = 2
    options: dict = field(default_factory=dict)


ScorerFactory = Callable[[GuideCondition], Scorer]
SCORERS: dict[str, ScorerFactory] = {}


def register_scorer(name: str, factory: ScorerFactory) -> None:
    """Make a scorer available to `ddn guide --task NAME` and `build_scorer(name, condition)`."""
    SCORERS[name] = factory


def build_scorer(name: str, condition: GuideCondition) -> Scorer:
    """Build the registered scorer `name` for `condition`; unknown names raise ValueError."""
    if name not in SCORERS:
        raise ValueError(
            f"unknown guidance task {name!r}; valid tasks: {', '.join(sorted(SCORERS))} "
            f"(register more with ddn_dist.guidance.register_scorer and --plugin MODULE)"
        )
    return SCORERS[name](condition)


def _inpaint_factory(condition: GuideCondition) -> Scorer:
    if condition.mask is None:
        raise ValueError("the inpaint task needs a mask (1 = known pixel); pass --mask MASK.png")
    return Inpaint(condition.image, condition.mask)


register_scorer("sr", lambda c: SuperResolution(c.image))
register_scorer("colorize", lambda c: Colorize(grayscale(c.image)))
register_scorer("inpaint", _inpaint_factory)
register_scorer("denoise", lambda c: Denoise(c.image))
register_scorer("lowbit", lambda c: LowBit(c.image, c.bits))


@dataclass
class Degradation:
    """Settings that turn a clean image into each task's observation (`ddn guide --degrade`)."""

    scale: int = 2
    bits: int = 2
    noise_std: float = 0.3
    seed: int = 0


def degrade(task: str, clean: torch.Tensor, mask: torch.Tensor | None,
            settings: Degradation) -> GuideCondition:
    """Make the observation of a built-in task from clean images (N, C, H, W) in [-1, 1]."""
    if task == "sr":
        size = (clean.shape[-2] // settings.scale, clean.shape[-1] // settings.scale)
        if min(size) < 1:
            raise ValueError(
                f"scale {settings.scale} is larger than the image {tuple(clean.shape[-2:])}"
            )
        return GuideCondition(resize(clean, size))
    if task == "colorize":
        return GuideCondition(grayscale(clean))
    if task == "inpaint":
        if mask is None:
            raise ValueError("the inpaint task needs a mask (1 = known); pass --mask MASK.png")
        return GuideCondition(clean * mask, mask=mask)
    if task == "denoise":
        generator = torch.Generator().manual_seed(settings.seed)
        noise = torch.randn(clean.shape, generator=generator) * settings.noise_std
        return GuideCondition(clean + noise)
    if task == "lowbit":
        return GuideCondition(quantise(clean, settings.bits), bits=settings.bits)
    raise ValueError(
        f"--degrade supports the built-in tasks sr, colorize, inpaint, denoise and lowbit, "
        f"not {task!r}; pass its observation with --input instead"
    )
