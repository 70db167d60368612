"""Split-and-Prune: keeps every head's selection frequency near 1/K.

Forward passes in training mode record per-DDL statistics into pending buffers. After each
optimizer step a trainer calls `local_stats_delta()`, sums the vector over ranks (one all_reduce),
and passes the sum to `step()`, so every rank has identical statistics and makes the identical
decision. Head weights are copied through a `ParamAccess`, which can hide ZeRO partitioning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ddn_dist.model.ddl import DiscreteDistributionLayer, SelectionStats, stats_size


@dataclass(frozen=True)
class SplitEvent:
    """One split+prune: head `split` was copied into slot `pruned` of DDL `layer`."""

    layer: int
    group: str
    split: int
    pruned: int


class ParamAccess(Protocol):
    """Row copies on parameters whose storage (and optimizer state) the caller owns."""

    def copy_rows(self, param: torch.nn.Parameter, src_rows: list[int], dst_rows: list[int]) -> None:
        """Copy rows (dim 0) src->dst of the parameter and of every same-shaped optimizer state."""
        ...


class LocalParamAccess:
    """ParamAccess for full local tensors and a plain torch optimizer (or none)."""

    def __init__(self, optimizer: torch.optim.Optimizer | None = None):
        self.optimizer = optimizer

    @torch.no_grad()
    def copy_rows(self, param: torch.nn.Parameter, src_rows: list[int], dst_rows: list[int]) -> None:
        """Copy the rows in the parameter and in every optimizer state tensor of its shape."""
        src = torch.tensor(src_rows, dtype=torch.long, device=param.device)
        dst = torch.tensor(dst_rows, dtype=torch.long, device=param.device)
        param.data[dst] = param.data[src]
        if self.optimizer is None:
            return
        for value in self.optimizer.state.get(param, {}).values():
            # Scalar state such as Adam's step has another shape and stays untouched.
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                value[dst.to(value.device)] = value[src.to(value.device)]


def choose_split_prune(count: torch.Tensor, loss_acc: torch.Tensor) -> tuple[int, int] | None:
    """Return (split, prune) heads when the rule triggers, else None.

    s = argmax(count), d = argmin(count) (among zero counts the largest loss_acc); trigger iff
    p_s - p_d > 1/K or p_d < 1/(2K), with p the normalised counts. The values reach the host in
    one transfer, so on a GPU this costs one synchronisation per DDL.
    """
    k = count.shape[0]
    split = torch.argmax(count)
    zero_loss = torch.where(count == 0, loss_acc, torch.full_like(loss_acc, -float("inf")))
    prune = torch.where(count.min() == 0, torch.argmax(zero_loss), torch.argmin(count))
    summary = torch.stack([split.double(), prune.double(), count[split], count[prune], count.sum()])
    split_index, prune_index, count_split, count_prune, total = summary.tolist()
    if total <= 0 or split_index == prune_index:
        return None
    p_split = count_split / total
    p_prune = count_prune / total
    if p_split - p_prune > 1.0 / k or p_prune < 1.0 / (2 * k):
        return int(split_index), int(prune_index)
    return None


def _normalise_rows(weights: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Normalise each row of `weights * allowed`; rows without mass become uniform over `allowed`."""
    weights = weights * allowed
    sums = weights.sum(1, keepdim=True)
    uniform = allowed / allowed.sum(1, keepdim=True).clamp_min(1)
    return torch.where(sums > 0, weights / sums.clamp_min(1e-300), uniform)


def _allowed_columns(rows: torch.Tensor, k: int, excluded: int, like: torch.Tensor) -> torch.Tensor:
    """Mask (len(rows), K) that forbids each row's own column and column `excluded`."""
    allowed = torch.ones(rows.numel(), k, dtype=like.dtype, device=like.device)
    allowed[torch.arange(rows.numel(), device=like.device), rows] = 0
    allowed[:, excluded] = 0
    return allowed


def prune_head(stats: SelectionStats, prune: int) -> None:
    """Hand head `prune`'s count and runner-up mass to the other heads, then zero it.

    Each head j receives the share w_j = near2[prune, j] / sum_j near2[prune, j] of prune's count
    (uniform when that row is empty). Prune's wins become head j's wins, spread over j's own
    runner-up profile. Samples that had `prune` as runner-up get a new runner-up in the same
    row, in proportion to w. Neither step ever names a head as its own runner-up. Only rows with mass to move
    are touched, so a prune costs O(rows x K), not O(K^2).
    """
    count, near2 = stats.count, stats.near2
    k = count.shape[0]
    row = near2[prune].clone()
    row[prune] = 0
    if float(row.sum()) > 0:
        share = row / row.sum()
    else:
        share = torch.full_like(row, 1.0 / (k - 1))
        share[prune] = 0

    count += count[prune] * share
    count[prune] = 0
    if k > 2:
        won_mass = float(near2[prune].sum())
        if won_mass > 0:
            receivers = torch.nonzero(share).flatten()
            allowed = _allowed_columns(receivers, k, prune, near2)
            profile = _normalise_rows(near2[receivers], allowed)
            near2[receivers] += (won_mass * share[receivers]).unsqueeze(1) * profile
        column = near2[:, prune].clone()
        column[prune] = 0
        losers = torch.nonzero(column).flatten()
        if losers.numel():
            allowed = _allowed_columns(losers, k, prune, near2)
            weights = _normalise_rows(share.unsqueeze(0).expand(losers.numel(), k), allowed)
            near2[losers] += column[losers].unsqueeze(1) * weights
    near2[prune] = 0
    near2[:, prune] = 0


def split_head(stats: SelectionStats, split: int, into: int) -> None:
    """Split head `split` into slots `split` and `into` (which must have been pruned).

    Both get half the count, and each column of runner-up counts is halved into both. Each becomes
    the other's runner-up with half of split's former runner-up mass, and loss_acc is copied.
    """
    count, near2 = stats.count, stats.near2
    count[split] = count[split] / 2
    count[into] = count[split]
    won_mass = near2[split].sum()
    column = near2[:, split] / 2
    near2[:, split] = column
    near2[:, into] = column
    near2[split] = 0
    near2[into] = 0
    near2[split, into] = won_mass / 2
    near2[into, split] = won_mass / 2
    stats.loss_acc[into] = stats.loss_acc[split]


def apply_split_prune(stats: SelectionStats, split: int, prune: int) -> None:
    """Prune head `prune`, then split head `split` into its slot (statistics only)."""
    prune_head(stats, prune)
    split_head(stats, split, prune)
    if stats.count.shape[0] == 2:
        # With two heads the runner-up is always the other head.
        stats.near2.zero_()
        stats.near2[0, 1] = stats.count[0]
        stats.near2[1, 0] = stats.count[1]


class SplitPrune:
    """Statistics and the split+prune rule for every DDL of a model.

    Two layouts of the flat statistics delta exist. The dense one (default) carries each DDL's
    near2 matrix, K*K values. The compact one, chosen by `max_samples_per_step`, carries instead
    the (winner, runner-up) pairs of the step: every rank writes its pairs into its own region of
    world_size * max_samples_per_step slots and zeros elsewhere, so the SUM all_reduce
    concatenates them. At 127 layers with K=512 this is 2048 slots per DDL for 64 ranks of 32
    samples, against 262,144 dense values.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        warmup_samples: int = 0,
        *,
        max_samples_per_step: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        """Track every DDL in `model.ddls`.

        max_samples_per_step enables the compact layout. It is the maximum number of samples one
        rank records into one DDL between two `local_stats_delta` calls: the micro-batch size
        times the gradient accumulation steps (times the passes for the recurrence paradigm).
        rank and world_size default to those of torch.distributed when it is initialised, else
        0 and 1.
        """
        self.ddls: list[DiscreteDistributionLayer] = list(model.ddls)
        if not self.ddls:
            raise ValueError("SplitPrune needs a model with at least one DDL (model.ddls is empty)")
        if warmup_samples < 0:
            raise ValueError(f"warmup_samples={warmup_samples} is invalid; use 0 or more samples")
        self.warmup_samples = int(warmup_samples)
        self.stats = [SelectionStats(ddl.k, ddl.weight.device) for ddl in self.ddls]
        self.max_samples_per_step = max_samples_per_step
        self.rank, self.world_size = 0, 1
        if max_samples_per_step is not None:
            if max_samples_per_step < 1:
                raise ValueError(
                    f"max_samples_per_step={max_samples_per_step} is invalid; use a positive count"
                )
            self.rank, self.world_size = _rank_and_world(rank, world_size)
        for ddl in self.ddls:
            ddl.record_pairs = max_samples_per_step is not None

    @property
    def compact(self) -> bool:
        """Whether the delta carries runner-up pairs instead of dense near2 matrices."""
        return self.max_samples_per_step is not None

    def _layer_size(self, k: int) -> int:
        if self.compact:
            return 2 * k + 1 + self.world_size * self.max_samples_per_step
        return stats_size(k)

    @property
    def delta_size(self) -> int:
        """Length of the flat vector returned by `local_stats_delta`."""
        return sum(self._layer_size(ddl.k) for ddl in self.ddls)

    def local_stats_delta(self) -> torch.Tensor:
        """Return this process's statistics since the last call as one flat float64 vector.

        Dense layout per DDL in order: count (K), near2 (K*K, row-major), loss_acc (K), seen (1).
        Compact layout per DDL: count (K), loss_acc (K), seen (1), then world_size regions of
        max_samples_per_step slots. A slot contains a runner-up pair code plus 1, and 0 marks an
        empty slot. This rank fills region `rank` only. The pending statistics are zeroed, so each sample is counted once.
        """
        parts = []
        for ddl in self.ddls:
            pending = ddl.pending_stats()
            if self.compact:
                parts += [pending.count, pending.loss_acc, pending.seen, self._pair_slots(ddl, pending)]
            else:
                parts.append(pending.flat())
        delta = torch.cat(parts)
        for ddl in self.ddls:
            ddl.pending_stats().zero_()
        return delta

    def _pair_slots(self, ddl: DiscreteDistributionLayer, pending: SelectionStats) -> torch.Tensor:
        capacity = self.max_samples_per_step
        slots = torch.zeros(self.world_size * capacity, dtype=torch.float64, device=pending.count.device)
        if pending.pairs:
            codes = torch.cat(pending.pairs)
            if codes.numel() > capacity:
                raise ValueError(
                    f"DDL {ddl.group} recorded {codes.numel()} samples since the last statistics "
                    f"collection but max_samples_per_step={capacity}; raise it to the micro-batch "
                    f"size times the gradient accumulation steps (times the recurrence passes)"
                )
            start = self.rank * capacity
            slots[start : start + codes.numel()] = codes.to(torch.float64) + 1
        return slots

    def _add_delta(self, stats: SelectionStats, k: int, flat: torch.Tensor) -> None:
        if not self.compact:
            stats.add_flat(flat)
            return
        flat = flat.to(device=stats.count.device, dtype=torch.float64)
        stats.count += flat[:k]
        stats.loss_acc += flat[k : 2 * k]
        stats.seen += flat[2 * k : 2 * k + 1]
        slots = flat[2 * k + 1 :]
        codes = slots[slots > 0].round().long() - 1
        ones = torch.ones(codes.numel(), dtype=torch.float64, device=codes.device)
        stats.near2.view(-1).index_add_(0, codes, ones)

    def step(self, summed_delta: torch.Tensor, access: ParamAccess) -> list[SplitEvent]:
        """Add the (rank-summed) delta, then apply at most one split+prune per DDL.

        Call it on every rank with the same vector so every rank applies the same row copies.
        """
        if summed_delta.dim() != 1 or summed_delta.numel() != self.delta_size:
            raise ValueError(
                f"statistics delta has shape {tuple(summed_delta.shape)}; expected "
                f"({self.delta_size},) from SplitPrune.local_stats_delta() of the same model "
                f"and the same max_samples_per_step and world size"
            )
        offset = 0
        for stats, ddl in zip(self.stats, self.ddls):
            size = self._layer_size(ddl.k)
            self._add_delta(stats, ddl.k, summed_delta[offset : offset + size])
            offset += size

        events = []
        for layer, (stats, ddl) in enumerate(zip(self.stats, self.ddls)):
            if self.warmup_samples and float(stats.seen) < self.warmup_samples:
                continue
            decision = choose_split_prune(stats.count, stats.loss_acc)
            if decision is None:
                continue
            split, prune = decision
            apply_split_prune(stats, split, prune)
            access.copy_rows(ddl.weight, ddl.head_rows(split), ddl.head_rows(prune))
            events.append(SplitEvent(layer=layer, group=ddl.group, split=split, pruned=prune))
        return events

    def frequencies(self, layer: int) -> torch.Tensor:
        """Return DDL `layer`'s selection frequencies (K,) on the CPU; zeros before any sample."""
        count = self.stats[layer].count.detach().cpu()
        total = float(count.sum())
        return count / total if total > 0 else torch.zeros_like(count)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Return all statistics as CPU tensors keyed "<layer>.<name>" (exact, float64)."""
        state = {"warmup_samples": torch.tensor(self.warmup_samples, dtype=torch.int64)}
        for layer, stats in enumerate(self.stats):
            for name, tensor in stats.tensors().items():
                state[f"{layer}.{name}"] = tensor.detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore statistics saved by `state_dict` of a model with the same K per DDL."""
        for layer, stats in enumerate(self.stats):
            for name, tensor in stats.tensors().items():
                key = f"{layer}.{name}"
                if key not in state:
                    raise KeyError(f"Split-and-Prune state has no {key!r}; was it saved from this model?")
                value = torch.as_tensor(state[key])
                if value.shape != tensor.shape:
                    raise ValueError(
                        f"Split-and-Prune state {key!r} has shape {tuple(value.shape)}, this model "
                        f"needs {tuple(tensor.shape)}; the checkpoint comes from another architecture"
                    )
                tensor.copy_(value.to(tensor.device, torch.float64))
        if "warmup_samples" in state:
            self.warmup_samples = int(state["warmup_samples"])


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if world_size is None:
        world_size = torch.distributed.get_world_size() if initialised else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is invalid for world_size={world_size}; use 0..{world_size - 1}")
    return rank, world_size
