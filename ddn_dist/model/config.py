"""Model configuration: the `model:` section of a preset YAML file, validated with clear errors."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

ARCHITECTURES = ("pyramid", "recurrence")
SELECTION_METHODS = ("expansion", "direct")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture and DDL options of a Discrete Distribution Network.

    The pyramid generator derives channels, K and blocks per scale from `resolution` and the caps.
    The recurrence paradigm applies one small network and one DDL `recurrence_passes` times.
    """

    architecture: str = "pyramid"
    """"pyramid" (one block and DDL per layer, coarse to fine) or "recurrence" (shared weights)."""
    resolution: int = 32
    """Image height and width in pixels; a power of two."""
    image_channels: int = 3
    """Channels of the generated image: 1 for grayscale, 3 for RGB."""
    max_channels: int = 256
    """Cap on the feature channels of every scale."""
    max_k: int = 512
    """Cap on the number of candidates K of every DDL."""
    max_blocks: int = 64
    """Cap on the number of blocks (and DDLs) per scale."""
    chain_dropout: float = 0.05
    """Probability, per layer and forward pass, that the whole micro-batch uses random indices."""
    learning_residual: bool = True
    """Add the previous layer's selected image (bilinearly resized) to every candidate."""
    leak_choice: bool = True
    """Project the second half of the channels with the selected head and feed it forward."""
    selection: str = "expansion"
    """Distance computation of guided selection: "expansion" (no candidates formed) or "direct"."""
    recurrence_channels: int = 64
    """Feature channels of the recurrence network."""
    recurrence_blocks: int = 2
    """Residual blocks in the recurrence network."""
    recurrence_passes: int = 10
    """Number of times the recurrence network and its DDL are applied (the number of layers)."""
    recurrence_k: int = 64
    """K of the single DDL of the recurrence paradigm."""

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> "ModelConfig":
        """Build a validated config from a mapping, rejecting unknown keys."""
        values = dict(values or {})
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown model option(s) {unknown}; valid options are {sorted(known)}"
            )
        config = cls(**values)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """Return the options as a plain dict (JSON and YAML serialisable)."""
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Raise ValueError naming the first invalid option and its valid range."""
        _check_choice("architecture", self.architecture, ARCHITECTURES)
        _check_choice("selection", self.selection, SELECTION_METHODS)
        for name in (
            "resolution",
            "image_channels",
            "max_channels",
            "max_k",
            "max_blocks",
            "recurrence_channels",
            "recurrence_blocks",
            "recurrence_passes",
            "recurrence_k",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name}={value!r} is invalid; use a positive integer")
        if self.resolution & (self.resolution - 1):
            raise ValueError(
                f"model.resolution={self.resolution} is invalid; use a power of two such as 8, 32, 64"
            )
        for name in ("learning_residual", "leak_choice"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"model.{name}={getattr(self, name)!r} is invalid; use true or false")
        if not isinstance(self.chain_dropout, (int, float)) or not 0.0 <= self.chain_dropout <= 1.0:
            raise ValueError(
                f"model.chain_dropout={self.chain_dropout!r} is invalid; use a probability in [0, 1]"
            )
        if self.max_k < 2 or self.recurrence_k < 2:
            raise ValueError("model.max_k and model.recurrence_k must be at least 2 (K=1 selects nothing)")
        channels = self.scale_channels() if self.architecture == "pyramid" else [self.recurrence_channels]
        for value in channels:
            if value % 2 or value < 2 * self.image_channels:
                raise ValueError(
                    f"feature channels {value} cannot hold {self.image_channels} image channels twice "
                    f"(DDL head and leak); raise model.max_channels or model.recurrence_channels to an "
                    f"even number >= {2 * self.image_channels}"
                )

    @property
    def num_scales(self) -> int:
        """Number of pyramid scales, 1x1 up to the resolution."""
        return int(math.log2(self.resolution)) + 1

    def scale_channels(self) -> list[int]:
        """Feature channels per scale: clip(2^(13-s), 4, 256), capped by max_channels."""
        return [min(max(4, min(2 ** (13 - s), 256)), self.max_channels) for s in range(self.num_scales)]

    def scale_ks(self) -> list[int]:
        """K per scale: clip(4 C(s), 16, 1024), halved for colour images, capped by max_k."""
        ks = []
        for channels in self.scale_channels():
            k = min(max(16, 4 * channels), 1024)
            if self.image_channels > 1:
                k //= 2
            ks.append(min(k, self.max_k))
        return ks

    def scale_blocks(self) -> list[int]:
        """Blocks per scale: 2^s, capped by max_blocks."""
        return [min(2**s, self.max_blocks) for s in range(self.num_scales)]

    def layer_ks(self) -> list[int]:
        """K of every layer in order."""
        if self.architecture == "recurrence":
            return [self.recurrence_k] * self.recurrence_passes
        return [k for k, n in zip(self.scale_ks(), self.scale_blocks()) for _ in range(n)]


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"model.{name}={value!r} is invalid; valid choices are {list(choices)}")
