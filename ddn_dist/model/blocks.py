"""Residual blocks of the DDN backbone (no attention, no conditioning embedding)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, fewer (gcd(32, channels / 2)) for narrow layers.

    Every group keeps at least two channels, because a group of one channel at 1x1 normalises to 0.
    """
    return nn.GroupNorm(math.gcd(32, max(channels // 2, 1)), channels, eps=1e-6)


class ResBlock(nn.Module):
    """GN -> SiLU -> [2x upsample] -> 3x3 conv -> GN -> SiLU -> 3x3 conv, plus skip, times sqrt(1/2).

    The second convolution starts near zero (Xavier-uniform times 1e-5), so every block starts
    close to a scaled identity. The skip path is a 1x1 convolution only when channels change.
    """

    def __init__(self, in_channels: int, out_channels: int, upsample: bool = False):
        super().__init__()
        self.upsample = upsample
        self.norm0 = group_norm(in_channels)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm1 = group_norm(out_channels)
        self.conv1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        with torch.no_grad():
            nn.init.xavier_uniform_(self.conv0.weight)
            nn.init.zeros_(self.conv0.bias)
            nn.init.xavier_uniform_(self.conv1.weight)
            self.conv1.weight.mul_(1e-5)
            nn.init.zeros_(self.conv1.bias)
            if self.skip is not None:
                nn.init.xavier_uniform_(self.skip.weight)
                nn.init.zeros_(self.skip.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm0(x))
        if self.upsample:
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        h = self.conv0(h)
        h = self.conv1(F.silu(self.norm1(h)))
        skip = x if self.skip is None else self.skip(x)
        return (h + skip) * math.sqrt(0.5)
