"""The Discrete Distribution Layer (DDL): K candidate images, one of which is selected per sample."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ddn_dist.model.inject import select_and_inject

# fn(layer_index, candidates (B, K, C, h, w)) -> (B,) long indices: a custom selection rule.
SelectFn = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class LayerOutput:
    """Output of one DDL: the next feature map and the selected image."""

    feature: torch.Tensor  # (B, C, h, w) input of the next block
    image: torch.Tensor  # (B, C_img, h, w) selected candidate, learning residual included
    indices: torch.Tensor  # (B,) long, the selected head per sample
    loss: torch.Tensor | None  # (B,) MSE of the selected candidate against the target, or None


class SelectionStats:
    """Selection statistics of one DDL, all float64 so integer counts stay exact up to 2^53.

    - count[k]: samples whose argmin was head k.
    - near2[i, j]: samples where head i won and head j was the runner-up.
    - loss_acc[k]: summed distance of head k to every sample, selected or not.
    - seen: samples recorded.
    A DDL keeps the pending ones (since the last collection); SplitPrune keeps the global sums.
    With `keep_pairs`, `record` stores each sample's (winner, runner-up) pair as the code
    winner * K + runner_up in `pairs` instead of adding it to the dense near2.
    """

    def __init__(self, k: int, device: torch.device | str = "cpu", keep_pairs: bool = False):
        self.count = torch.zeros(k, dtype=torch.float64, device=device)
        self.near2 = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.loss_acc = torch.zeros(k, dtype=torch.float64, device=device)
        self.seen = torch.zeros(1, dtype=torch.float64, device=device)
        self.keep_pairs = keep_pairs
        self.pairs: list[torch.Tensor] = []

    def tensors(self) -> dict[str, torch.Tensor]:
        """Return the statistics by name."""
        return {"count": self.count, "near2": self.near2, "loss_acc": self.loss_acc, "seen": self.seen}

    def record(self, distances: torch.Tensor) -> None:
        """Add a batch of distances (B, K) computed before any chain-dropout override."""
        k = distances.shape[1]
        top2 = distances.topk(2, dim=1, largest=False).indices  # (B, 2): winner, runner-up
        ones = torch.ones(distances.shape[0], dtype=torch.float64, device=self.count.device)
        top2 = top2.to(self.count.device)
        self.count.index_add_(0, top2[:, 0], ones)
        pair_codes = top2[:, 0] * k + top2[:, 1]
        if self.keep_pairs:
            self.pairs.append(pair_codes)
        else:
            self.near2.view(-1).index_add_(0, pair_codes, ones)
        self.loss_acc += distances.sum(0, dtype=torch.float64).to(self.count.device)
        self.seen += distances.shape[0]

    def flat(self) -> torch.Tensor:
        """Return count, near2 (row-major), loss_acc, seen as one float64 vector."""
        return torch.cat([self.count, self.near2.view(-1), self.loss_acc, self.seen])

    def add_flat(self, flat: torch.Tensor) -> None:
        """Add a vector laid out as `flat()` returns it."""
        k = self.count.shape[0]
        flat = flat.to(device=self.count.device, dtype=torch.float64)
        self.count += flat[:k]
        self.near2 += flat[k : k + k * k].view(k, k)
        self.loss_acc += flat[k + k * k : 2 * k + k * k]
        self.seen += flat[-1:]

    def zero_(self) -> None:
        """Reset every statistic to zero in place."""
        for tensor in self.tensors().values():
            tensor.zero_()
        self.pairs.clear()


def stats_size(k: int) -> int:
    """Length of one DDL's flat statistics vector: count, near2, loss_acc, seen."""
    return k * k + 2 * k + 1


def distances_direct(
    head_input: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Return the MSE (B, K) of every candidate against the target, forming all candidates.

    head_input (B, Ch, h, w); weight (K * C_img, Ch); residual and target (B, C_img, h, w).
    """
    batch, image_channels = target.shape[:2]
    pixels = target.shape[2] * target.shape[3]
    flat_input = head_input.float().flatten(2)  # (B, Ch, P)
    candidates = torch.matmul(weight.float(), flat_input)  # (B, K * C_img, P)
    candidates = candidates.view(batch, -1, image_channels, pixels)
    error = candidates + residual.float().flatten(2).unsqueeze(1) - target.float().flatten(2).unsqueeze(1)
    return error.square().mean(dim=(2, 3))


def distances_expansion(
    head_input: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Return the same MSE (B, K) as `distances_direct` without forming the candidates.

    With x_p the head input at pixel p, u_p = target_p - residual_p and W_k the (C_img, Ch) head:
    sum_p ||W_k x_p - u_p||^2 = <G, W_k^T W_k> - 2 <W_k, M> + sum_p ||u_p||^2, where G = sum_p x_p x_p^T
    and M = sum_p u_p x_p^T. Everything runs in fp32 because the sum cancels.
    """
    batch, image_channels = target.shape[:2]
    pixels = target.shape[2] * target.shape[3]
    head_channels = head_input.shape[1]
    x = head_input.float().flatten(2)  # (B, Ch, P)
    u = (target.float() - residual.float()).flatten(2)  # (B, C_img, P)
    heads = weight.float().view(-1, image_channels, head_channels)  # (K, C_img, Ch)

    gram = torch.bmm(x, x.transpose(1, 2))  # (B, Ch, Ch)
    moment = torch.bmm(u, x.transpose(1, 2))  # (B, C_img, Ch)
    head_gram = torch.einsum("kic,kid->kcd", heads, heads)  # (K, Ch, Ch)

    quadratic = gram.view(batch, -1) @ head_gram.view(heads.shape[0], -1).T  # (B, K)
    cross = moment.view(batch, -1) @ heads.view(heads.shape[0], -1).T  # (B, K)
    target_energy = u.square().sum(dim=(1, 2)).unsqueeze(1)  # (B, 1)
    squared_error = (quadratic - 2.0 * cross + target_energy).clamp_min(0.0)
    return squared_error / (image_channels * pixels)


class DiscreteDistributionLayer(nn.Module):
    """One DDL: a bias-free 1x1 convolution producing K candidate images, and their selection.

    The head input is the first half of the feature channels (all of them without leak choice).
    The weight has shape (K * C_img, Ch); rows k*C_img .. k*C_img + C_img - 1 form head k.
    """

    def __init__(
        self,
        channels: int,
        k: int,
        image_channels: int,
        *,
        learning_residual: bool = True,
        leak_choice: bool = True,
        chain_dropout: float = 0.0,
        selection: str = "expansion",
        group: str = "",
    ):
        super().__init__()
        if leak_choice and (channels % 2 or channels < 2 * image_channels):
            raise ValueError(
                f"a DDL with leak choice needs an even channel count >= {2 * image_channels}, "
                f"got {channels}"
            )
        self.channels = channels
        self.k = k
        self.image_channels = image_channels
        self.head_channels = channels // 2 if leak_choice else channels
        self.learning_residual = learning_residual
        self.leak_choice = leak_choice
        self.chain_dropout = chain_dropout
        self.selection = selection
        self.group = group
        self.weight = nn.Parameter(torch.empty(k * image_channels, self.head_channels))
        bound = 1.0 / math.sqrt(self.head_channels)  # the default init of a 1x1 nn.Conv2d
        nn.init.uniform_(self.weight, -bound, bound)
        self.pending: SelectionStats | None = None
        self.record_pairs = False  # set by SplitPrune for its compact statistics layout

    def head_rows(self, head: int) -> list[int]:
        """Rows of `weight` (dim 0) that belong to one head."""
        return list(range(head * self.image_channels, (head + 1) * self.image_channels))

    def pending_stats(self) -> SelectionStats:
        """Return the statistics recorded since the last collection (created on first use)."""
        pending = self.pending
        if pending is None or pending.count.device != self.weight.device or (
            pending.keep_pairs != self.record_pairs
        ):
            self.pending = SelectionStats(self.k, self.weight.device, keep_pairs=self.record_pairs)
        return self.pending

    def residual_for(self, previous_image: torch.Tensor | None, feature: torch.Tensor) -> torch.Tensor:
        """Return the learning residual (B, C_img, h, w): the previous image resized, or zeros."""
        batch, _, height, width = feature.shape
        if previous_image is None or not self.learning_residual:
            return feature.new_zeros(batch, self.image_channels, height, width)
        if previous_image.shape[-2:] == (height, width):
            return previous_image
        return F.interpolate(previous_image, size=(height, width), mode="bilinear", align_corners=False)

    def candidates(self, feature: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Return all K candidates (B, K, C_img, h, w); used by custom selection rules."""
        batch, _, height, width = feature.shape
        head_input = feature[:, : self.head_channels].flatten(2)
        out = torch.matmul(self.weight.to(feature.dtype), head_input)
        out = out.view(batch, self.k, self.image_channels, height, width)
        return out + residual.unsqueeze(1)

    def distances(self, feature: torch.Tensor, residual: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the MSE (B, K) of every candidate against the resized target, without grad.

        "expansion" uses the Gram-matrix form when it is cheaper than forming the candidates,
        which it is once the pixel count exceeds Ch / C_img.
        """
        head_input = feature[:, : self.head_channels]
        pixels = feature.shape[2] * feature.shape[3]
        with torch.no_grad():
            if self.selection == "expansion" and pixels * self.image_channels > self.head_channels:
                return distances_expansion(head_input, self.weight, residual, target)
            return distances_direct(head_input, self.weight, residual, target)

    def forward(
        self,
        feature: torch.Tensor,
        previous_image: torch.Tensor | None,
        *,
        target: torch.Tensor | None = None,
        indices: torch.Tensor | None = None,
        select_fn: SelectFn | None = None,
        layer_index: int = 0,
        valid: torch.Tensor | None = None,
        record: bool = True,
    ) -> LayerOutput:
        """Select one candidate per sample and build the next block's input.

        Exactly one source picks the heads: `indices` (B,) given, else `select_fn`, else guided
        selection against `target` (B, C_img, h, w), already resized to this layer's size. In
        training mode with `record` set, guided selection records statistics (of the `valid`
        samples) and applies chain dropout. The loss is returned whenever a target is given.
        """
        residual = self.residual_for(previous_image, feature)
        if indices is None and select_fn is not None:
            with torch.no_grad():
                indices = select_fn(layer_index, self.candidates(feature, residual))
            indices = self._check_indices(indices, feature.shape[0], "select_fn")
        elif indices is None:
            if target is None:
                raise ValueError("a DDL needs indices, a select_fn or a target to select a candidate")
            distances = self.distances(feature, residual, target)
            indices = distances.argmin(dim=1)
            if self.training and record:
                recorded = distances if valid is None else distances[valid]
                if recorded.shape[0] > 0:
                    self.pending_stats().record(recorded)
                if self.chain_dropout > 0 and torch.rand(()) < self.chain_dropout:
                    indices = torch.randint(self.k, indices.shape, device=indices.device)
        else:
            indices = self._check_indices(indices, feature.shape[0], "indices")

        heads = self.weight.view(self.k, self.image_channels, self.head_channels)
        image, next_feature = select_and_inject(
            feature, heads[indices], residual, self.head_channels, self.leak_choice
        )
        loss = None
        if target is not None:
            loss = (image.float() - target.float()).square().mean(dim=(1, 2, 3))
        return LayerOutput(next_feature, image, indices, loss)

    def selected_output(
        self, feature: torch.Tensor, indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Compute only the selected heads (with grad) and their leak from per-sample weights.

        Each sample is multiplied by its own gathered (C_img, Ch) weight, so the result for one
        sample does not depend on the rest of the batch. `forward` computes the same through
        `select_and_inject`, which saves less for backward; this plain-autograd form is the
        reference it is tested against.
        """
        batch, _, height, width = feature.shape
        heads = self.weight.to(feature.dtype).view(self.k, self.image_channels, self.head_channels)
        selected = heads[indices]  # (B, C_img, Ch)
        head_input = feature[:, : self.head_channels].flatten(2)
        image = torch.bmm(selected, head_input).view(batch, self.image_channels, height, width)
        leak = None
        if self.leak_choice:
            leak_input = feature[:, self.head_channels :].flatten(2)
            leak = torch.bmm(selected, leak_input).view(batch, self.image_channels, height, width)
        return image, leak

    def next_feature(
        self, feature: torch.Tensor, image: torch.Tensor, leak: torch.Tensor | None
    ) -> torch.Tensor:
        """Add the selected image into channels 0..C_img-1 and the leak into the last C_img."""
        c = self.image_channels
        parts = [feature[:, :c] + image.to(feature.dtype)]
        if leak is None:
            parts.append(feature[:, c:])
        else:
            parts.append(feature[:, c : self.channels - c])
            parts.append(feature[:, self.channels - c :] + leak)
        return torch.cat(parts, dim=1)

    def _check_indices(self, indices: torch.Tensor, batch: int, source: str) -> torch.Tensor:
        if not isinstance(indices, torch.Tensor) or indices.shape != (batch,):
            shape = getattr(indices, "shape", type(indices).__name__)
            raise ValueError(f"{source} must give a ({batch},) index tensor, got {shape}")
        indices = indices.to(device=self.weight.device, dtype=torch.long)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.k):
            raise ValueError(
                f"{source} gave head indices in [{int(indices.min())}, {int(indices.max())}]; "
                f"valid heads are 0..{self.k - 1}"
            )
        return indices
