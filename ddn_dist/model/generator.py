"""Discrete Distribution Networks: the single-shot pyramid generator and the recurrence paradigm."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ddn_dist.model.blocks import ResBlock
from ddn_dist.model.config import ModelConfig
from ddn_dist.model.ddl import DiscreteDistributionLayer, SelectFn


@dataclass
class DDNOutput:
    """Result of one pass through all layers."""

    image: torch.Tensor  # (B, C_img, H, W) the last layer's selected image
    codes: torch.Tensor  # (B, L) long, the selected head of every layer
    layer_losses: torch.Tensor | None = None  # (L,) mean MSE per layer, with grad; None without target
    loss: torch.Tensor | None = None  # scalar, mean of layer_losses
    per_sample_loss: torch.Tensor | None = None  # (B,) mean over layers of each sample's MSE


class DDN(nn.Module):
    """A Discrete Distribution Network: L blocks, each followed by a DDL.

    Call it with a target (B, C_img, H, W) in [-1, 1] for guided selection (training, encoding),
    with `codes` (B, L) to decode, or with `select_fn` and `num` for a custom selection rule.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.resolution = config.resolution
        self.image_channels = config.image_channels
        if config.architecture == "pyramid":
            self._build_pyramid(config)
        else:
            self._build_recurrence(config)

    def _make_ddl(self, channels: int, k: int, group: str) -> DiscreteDistributionLayer:
        return DiscreteDistributionLayer(
            channels,
            k,
            self.image_channels,
            learning_residual=self.config.learning_residual,
            leak_choice=self.config.leak_choice,
            chain_dropout=self.config.chain_dropout,
            selection=self.config.selection,
            group=group,
        )

    def _build_pyramid(self, config: ModelConfig) -> None:
        blocks, ddls, groups = [], [], []
        channels = config.scale_channels()
        previous = channels[0]
        for scale, (c, k, n) in enumerate(zip(channels, config.scale_ks(), config.scale_blocks())):
            size = 2**scale
            for j in range(n):
                blocks.append(ResBlock(previous, c, upsample=scale > 0 and j == 0))
                ddls.append(self._make_ddl(c, k, f"{size}x{size}"))
                groups.append(f"{size}x{size}")
                previous = c
        self.blocks = nn.ModuleList(blocks)
        self.ddls = nn.ModuleList(ddls)
        self.layer_groups = groups
        self._layer_ddl = list(range(len(ddls)))
        self.register_buffer(
            "initial_feature", torch.linspace(-1.0, 1.0, channels[0]).view(1, -1, 1, 1), persistent=False
        )
        self._initial_size = 1

    def _build_recurrence(self, config: ModelConfig) -> None:
        c = config.recurrence_channels
        group = f"{config.resolution}x{config.resolution}"
        self.blocks = nn.ModuleList([ResBlock(c, c) for _ in range(config.recurrence_blocks)])
        self.ddls = nn.ModuleList([self._make_ddl(c, config.recurrence_k, group)])
        self.layer_groups = [group] * config.recurrence_passes
        self._layer_ddl = [0] * config.recurrence_passes
        self.register_buffer(
            "initial_feature", torch.linspace(-1.0, 1.0, c).view(1, -1, 1, 1), persistent=False
        )
        self._initial_size = config.resolution

    @property
    def num_layers(self) -> int:
        """Number of selection layers L (the length of a latent code)."""
        return len(self._layer_ddl)

    @property
    def ks(self) -> list[int]:
        """K of every layer."""
        return [self.ddls[i].k for i in self._layer_ddl]

    @property
    def latent_bits(self) -> float:
        """Bits in a latent code: sum over layers of log2 K."""
        return float(sum(math.log2(k) for k in self.ks))

    @property
    def num_outputs(self) -> int:
        """Number of distinct codes, the product of K over layers (K^L for a constant K)."""
        return math.prod(self.ks)

    def group_means(self, layer_values: torch.Tensor) -> dict[str, float]:
        """Average per-layer values (L,), e.g. `layer_losses`, over each layer group ("8x8")."""
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for group, value in zip(self.layer_groups, layer_values.detach().float().cpu().tolist()):
            sums[group] = sums.get(group, 0.0) + value
            counts[group] = counts.get(group, 0) + 1
        return {group: sums[group] / counts[group] for group in sums}

    def ddl_index(self, layer: int) -> int:
        """Index into `ddls` of the DDL that layer `layer` uses (always 0 for recurrence)."""
        return self._layer_ddl[layer]

    def _layer_block(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if self.config.architecture == "pyramid":
            return self.blocks[layer](x)
        for block in self.blocks:
            x = block(x)
        return x

    def forward(
        self,
        target: torch.Tensor | None = None,
        *,
        codes: torch.Tensor | None = None,
        select_fn: SelectFn | None = None,
        num: int | None = None,
        valid: torch.Tensor | None = None,
        record: bool = True,
    ) -> DDNOutput:
        """Run all layers; see the class docstring for the three ways of selecting.

        `codes` may be long (B, L) head indices or floats in [0, 1) scaled by each layer's K.
        `valid` (B,) bool excludes padding samples from the statistics and the layer losses.
        """
        batch = self._batch_size(target, codes, num)
        device = self.initial_feature.device
        if target is not None:
            target = self._check_target(target)
        if codes is not None:
            codes = self._code_indices(codes, batch)

        size = self._initial_size
        # The feature stays in the model's dtype (fp32, or bf16/fp16 under DeepSpeed); distances
        # and losses are computed in fp32 whatever the dtype of the target.
        x = self.initial_feature.expand(batch, -1, size, size).to(device)
        image = None
        resized: dict[tuple[int, int], torch.Tensor] = {}
        chosen, losses = [], []
        for layer in range(self.num_layers):
            x = self._layer_block(layer, x)
            layer_target = None
            if target is not None:
                key = tuple(x.shape[-2:])
                if key not in resized:
                    resized[key] = F.interpolate(target, size=key, mode="area")
                layer_target = resized[key]
            out = self.ddls[self._layer_ddl[layer]](
                x,
                image,
                target=layer_target,
                indices=None if codes is None else codes[:, layer],
                select_fn=select_fn,
                layer_index=layer,
                valid=valid,
                record=record,
            )
            x, image = out.feature, out.image
            chosen.append(out.indices)
            if out.loss is not None:
                losses.append(out.loss)

        result = DDNOutput(image=image, codes=torch.stack(chosen, dim=1))
        if losses:
            per_layer = torch.stack(losses, dim=1)  # (B, L)
            result.per_sample_loss = per_layer.mean(dim=1)
            if valid is not None:
                weights = valid.to(per_layer.dtype).unsqueeze(1)
                result.layer_losses = (per_layer * weights).sum(0) / weights.sum().clamp_min(1.0)
            else:
                result.layer_losses = per_layer.mean(dim=0)
            result.loss = result.layer_losses.mean()
        return result

    @torch.no_grad()
    def sample(
        self, num: int, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> DDNOutput:
        """Draw `num` samples with uniform indices from `generator` (CPU or on the model's device)."""
        device = self.initial_feature.device if device is None else torch.device(device)
        gen_device = generator.device if generator is not None else device
        codes = torch.stack(
            [torch.randint(k, (num,), generator=generator, device=gen_device) for k in self.ks], dim=1
        )
        return self.forward(codes=codes.to(device))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Return the latent codes (B, L) of images by guided selection (no statistics, no dropout)."""
        return self.forward(images, record=False).codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Return the images (B, C_img, H, W) of latent codes (B, L)."""
        return self.forward(codes=codes).image

    def _batch_size(self, target, codes, num) -> int:
        for value in (target, codes):
            if value is not None:
                return value.shape[0]
        if num is None:
            raise ValueError("DDN needs a target, codes, or num (the batch size) with select_fn")
        return int(num)

    def _check_target(self, target: torch.Tensor) -> torch.Tensor:
        expected = (self.image_channels, self.resolution, self.resolution)
        if target.dim() != 4 or tuple(target.shape[1:]) != expected:
            raise ValueError(
                f"target has shape {tuple(target.shape)}; this model needs (B, {expected[0]}, "
                f"{expected[1]}, {expected[2]}) images in [-1, 1]"
            )
        return target.to(self.initial_feature.device)

    def _code_indices(self, codes: torch.Tensor, batch: int) -> torch.Tensor:
        if codes.dim() != 2 or codes.shape[1] != self.num_layers:
            raise ValueError(
                f"codes have shape {tuple(codes.shape)}; this model needs (B, {self.num_layers})"
            )
        codes = codes.to(self.initial_feature.device)
        if codes.is_floating_point():
            ks = torch.tensor(self.ks, device=codes.device, dtype=codes.dtype)
            scaled = torch.floor(codes * ks).long()
            return torch.minimum(scaled.clamp_min(0), (ks - 1).long())
        return codes.long()


def build_model(config: ModelConfig) -> DDN:
    """Build a DDN from a validated config."""
    return DDN(config)
