"""Schedule in images (EDM style): learning-rate warm-up and interval triggers in kimg or minutes."""

from __future__ import annotations

import time
from dataclasses import dataclass


def learning_rate(nimg: int, base_lr: float, warmup_kimg: float) -> float:
    """Return the learning rate after `nimg` images: linear from 0 over the warm-up, constant after.

    The rate for a step is taken at the image count after that step, so the first step trains.
    """
    if warmup_kimg <= 0:
        return base_lr
    return base_lr * min(1.0, nimg / (warmup_kimg * 1000.0))


def ema_beta(batch_images: int, halflife_kimg: float) -> float:
    """Return the per-step EMA decay so that the weight of old images halves every `halflife_kimg`."""
    if halflife_kimg <= 0:
        return 0.0
    return 0.5 ** (batch_images / (halflife_kimg * 1000.0))


@dataclass
class Interval:
    """A trigger that fires every `kimg` thousand images and/or every `minutes` of wall time.

    Zero disables that part. The image part fires when the image count crosses a multiple of the
    interval, so it lands on the same steps after a resume.
    """

    kimg: float
    minutes: float = 0.0
    last_time: float = 0.0

    def __post_init__(self) -> None:
        self.last_time = time.monotonic()

    def due(self, prev_nimg: int, nimg: int, now: float | None = None) -> bool:
        """Return whether the trigger fires for a step that moved the count from prev_nimg to nimg."""
        return self.kimg_due(prev_nimg, nimg) or self.time_due(now)

    def kimg_due(self, prev_nimg: int, nimg: int) -> bool:
        """Return whether the image count crossed a multiple of the interval."""
        if self.kimg <= 0:
            return False
        size = self.kimg * 1000.0
        return int(nimg // size) > int(prev_nimg // size)

    def time_due(self, now: float | None = None) -> bool:
        """Return whether `minutes` of wall time have passed since the last reset.

        Clocks differ between ranks, so a distributed loop takes this from one rank and shares it.
        """
        now = time.monotonic() if now is None else now
        return self.minutes > 0 and now - self.last_time >= self.minutes * 60.0

    def reset(self, now: float | None = None) -> None:
        """Start the wall-time part again (call after acting on the trigger)."""
        self.last_time = time.monotonic() if now is None else now
