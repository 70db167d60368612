"""Quality figures on the scikit-learn digits: recognisability, class balance, reconstruction.

A logistic-regression classifier (scikit-learn defaults, C = 1) is trained on 75 % of the 1,797
digits (a stratified split with a fixed seed) and labels the generated samples:
- confident share: the share of images whose top class probability is above 0.5. The generated
  share must reach at least 90 % of the share on the 25 % of real digits held out from the
  classifier. Blurry averages of two digits reach about 83 % of the real share with this classifier.
- class shares: the share of samples given each class (argmax). Each must lie in [4 %, 25 %], so
  a model that draws only a few digit shapes fails.
- reconstruction PSNR: the digits held out from the classifier are encoded by guided selection and
  rebuilt from the first n layers of their code (the n-th layer's selected image, bilinearly
  resized to full size). The mean PSNR for n = 1 .. L shows how quality grows with the bits used.
  A model trained on all 1,797 digits has seen these images, so this measures fit, not
  generalisation.

Digits are 8x8 with values 0..16 and are mapped to 8-bit pixels by round(v * 255 / 16), then to
[-1, 1], the same pixels a PNG shard of them holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

CONFIDENCE = 0.5
SHARE_RATIO_TARGET = 0.9
CLASS_SHARE_RANGE = (0.04, 0.25)


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """Return the 1,797 digits as (N, 1, 8, 8) float32 in [-1, 1] and their (N,) labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * 255.0 / 16.0)
    images = (pixels / 127.5 - 1).astype(np.float32)[:, None]
    return images, digits.target.astype(np.int64)


@dataclass
class DigitsClassifier:
    """The fitted classifier and the real digits held out from its training."""

    model: object
    held_out_images: np.ndarray  # (N, 1, 8, 8) in [-1, 1]
    held_out_labels: np.ndarray  # (N,)

    def probabilities(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """Return class probabilities (N, 10) of (N, C, H, W) images in [-1, 1].

        Colour images are reduced to their channel mean, and other sizes are area-resized to 8x8.
        """
        images = torch.as_tensor(np.asarray(images), dtype=torch.float32)
        if images.shape[1] > 1:
            images = images.mean(dim=1, keepdim=True)
        if tuple(images.shape[-2:]) != (8, 8):
            images = F.interpolate(images, size=(8, 8), mode="area")
        return self.model.predict_proba(images.reshape(images.shape[0], -1).numpy())


def train_digits_classifier(seed: int = 0) -> DigitsClassifier:
    """Fit the classifier on 75 % of the digits (stratified split seeded by `seed`)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    images, labels = digits_images()
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=0.25, stratify=labels, random_state=seed
    )
    classifier = LogisticRegression(max_iter=5000)
    classifier.fit(train_x.reshape(len(train_x), -1), train_y)
    return DigitsClassifier(classifier, test_x, test_y)


def confident_share(probabilities: np.ndarray) -> float:
    """Share of rows whose top class probability is above 0.5."""
    return float((probabilities.max(axis=1) > CONFIDENCE).mean())


def psnr(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image (N,) of images in [-1, 1], over the [0, 1] range (peak 1)."""
    error = ((images.float() - references.float()) / 2).square().flatten(1).mean(dim=1)
    return -10 * torch.log10(error.clamp_min(1e-10))


class _LayerRecorder:
    """A selection rule that replays given codes and keeps each layer's selected image."""

    def __init__(self, codes: torch.Tensor):
        self.codes = codes
        self.selected: list[torch.Tensor] = []

    def __call__(self, layer: int, candidates: torch.Tensor) -> torch.Tensor:
        indices = self.codes[:, layer].to(candidates.device)
        rows = torch.arange(candidates.shape[0], device=candidates.device)
        self.selected.append(candidates[rows, indices].float().cpu())  # (B, C, h, w)
        return indices


@torch.no_grad()
def layer_images(model, codes: torch.Tensor) -> list[torch.Tensor]:
    """Return, for every layer n, the image (B, C, H, W) selected after the first n + 1 layers.

    Coarse layers' images are resized bilinearly to the full resolution.
    """
    recorder = _LayerRecorder(codes)
    was_training = model.training
    model.eval()
    try:
        final = model(select_fn=recorder, num=codes.shape[0]).image.float().cpu()
    finally:
        model.train(was_training)
    size = tuple(final.shape[-2:])
    return [
        image if tuple(image.shape[-2:]) == size
        else F.interpolate(image, size=size, mode="bilinear", align_corners=False)
        for image in recorder.selected
    ]


@torch.no_grad()
def psnr_by_layers(model, images: torch.Tensor, batch_size: int = 256) -> list[float]:
    """Mean PSNR (dB) of images rebuilt from the first n layers of their code, for n = 1 .. L."""
    from ddn_dist.sampling import model_device

    device = model_device(model)
    sums = np.zeros(model.num_layers)
    for chunk in images.split(batch_size):
        codes = model.encode(chunk.to(device)).cpu()
        for layer, rebuilt in enumerate(layer_images(model, codes)):
            sums[layer] += float(psnr(rebuilt, chunk).sum())
    return (sums / len(images)).tolist()


@dataclass
class DigitsQuality:
    """Quality figures of a digits model; `passed` applies the targets."""

    num_samples: int
    sample_confident_share: float
    real_confident_share: float
    class_shares: list[float]
    psnr_by_layers: list[float] = field(default_factory=list)
    num_held_out: int = 0

    @property
    def share_ratio(self) -> float:
        """Generated confident share divided by the real held-out confident share."""
        return self.sample_confident_share / self.real_confident_share

    @property
    def final_psnr(self) -> float:
        """Mean reconstruction PSNR (dB) with all layers (NaN when not measured)."""
        return self.psnr_by_layers[-1] if self.psnr_by_layers else math.nan

    @property
    def passed(self) -> bool:
        """True when the confident-share ratio is >= 0.9 and every class share is in [4 %, 25 %]."""
        low, high = CLASS_SHARE_RANGE
        balanced = all(low <= share <= high for share in self.class_shares)
        return self.share_ratio >= SHARE_RATIO_TARGET and balanced

    def summary(self) -> str:
        """Format every figure and the verdict as one line."""
        shares = " ".join(f"{share:.0%}" for share in self.class_shares)
        curve = ""
        if self.psnr_by_layers:
            first, last = self.psnr_by_layers[0], self.psnr_by_layers[-1]
            curve = f"; reconstruction PSNR {first:.1f} dB (1 layer) -> {last:.1f} dB " \
                    f"({len(self.psnr_by_layers)} layers)"
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"digits quality {verdict}: confident share {self.sample_confident_share:.1%} of "
            f"{self.num_samples} samples vs {self.real_confident_share:.1%} of real held-out "
            f"digits "
            f"(ratio {self.share_ratio:.2f}, target >= {SHARE_RATIO_TARGET}); class shares "
            f"[{shares}] (target 4 %-25 % each){curve}"
        )


def digits_quality(model, num_samples: int = 2000, seed: int = 0, batch_size: int = 256,
                   measure_psnr: bool = True) -> DigitsQuality:
    """Measure the digits quality figures of `model` on `num_samples` samples (seeds seed ..).

    Seeds are drawn as by `ddn sample`, so the figures do not depend on `batch_size`.
    """
    from ddn_dist.sampling import sample_seeds

    classifier = train_digits_classifier(seed)
    samples = sample_seeds(model, list(range(seed, seed + num_samples)), batch_size).images
    probabilities = classifier.probabilities(samples)
    predicted = probabilities.argmax(axis=1)
    class_shares = np.bincount(predicted, minlength=10) / len(predicted)
    real_share = confident_share(classifier.probabilities(classifier.held_out_images))

    curve: list[float] = []
    if measure_psnr:
        held_out = _to_model_format(model, torch.from_numpy(classifier.held_out_images))
        curve = psnr_by_layers(model, held_out, batch_size)
    return DigitsQuality(
        num_samples=num_samples,
        sample_confident_share=confident_share(probabilities),
        real_confident_share=real_share,
        class_shares=[float(share) for share in class_shares],
        psnr_by_layers=curve,
        num_held_out=len(classifier.held_out_images),
    )


def _to_model_format(model, images: torch.Tensor) -> torch.Tensor:
    """Convert (N, 1, 8, 8) digits to the model's channels and resolution."""
    config = model.config
    if config.image_channels != images.shape[1]:
        images = images.repeat(1, config.image_channels, 1, 1)
    if config.resolution != images.shape[-1]:
        images = F.interpolate(images, size=(config.resolution, config.resolution), mode="bilinear",
                               align_corners=False)
    return images
