"""Epoch plans over a shard index, interval sets of plan positions, and the deal of a pass.

An epoch plan is a function of (seed, epoch) only. It shuffles the shard order and rotates each
shard's file order by a random offset, and concatenates the rotated shards into the epoch's global
sequence G of N positions. Position p of G names one (shard, sample) pair. Loader state is the set
of consumed positions of G as sorted disjoint half-open intervals, which does not depend on the
world size or the number of loader workers.

A pass is one iteration over the samples of an epoch that were not consumed when it started. The
remaining positions are cut into runs that are contiguous in a shard's file order, so each run is
one ranged read. The runs are shuffled and dealt to the world_size x num_workers streams, and
every rank receives the same number of batches.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import numpy as np

from ddn_dist.data.index import ShardIndex

REMAINDER_RULES = ("drop", "pad")

# Salts that keep the random streams of one (seed, epoch) independent of each other.
_SHARD_ORDER_SALT = 1
_RUN_ORDER_SALT = 2
_MERGE_SALT = 3


def rng_for(*words: int) -> np.random.Generator:
    """Return a numpy generator seeded by a tuple of non-negative integers."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) for w in words])))


class IntervalSet:
    """A set of integers stored as sorted, disjoint, non-adjacent half-open intervals [a, b)."""

    def __init__(self, intervals: list[tuple[int, int]] | None = None):
        self._starts: list[int] = []
        self._ends: list[int] = []
        for start, end in sorted(intervals or []):
            self.add_range(start, end)

    @classmethod
    def from_positions(cls, positions) -> IntervalSet:
        """Build the set of the given integer positions."""
        result = cls()
        for position in sorted(int(p) for p in positions):
            result.add_range(position, position + 1)
        return result

    def add_range(self, start: int, end: int) -> None:
        """Add [start, end) to the set, merging with overlapping or adjacent intervals."""
        if end <= start:
            return
        # Intervals that overlap or touch [start, end) lie between these two indices.
        first = bisect.bisect_left(self._ends, start)
        last = bisect.bisect_right(self._starts, end)
        if first < last:
            start = min(start, self._starts[first])
            end = max(end, self._ends[last - 1])
        self._starts[first:last] = [start]
        self._ends[first:last] = [end]

    def update(self, other: IntervalSet) -> None:
        """Add every interval of `other`."""
        for start, end in other.intervals():
            self.add_range(start, end)

    def intervals(self) -> list[tuple[int, int]]:
        """Return the intervals as a sorted list of (start, end) pairs."""
        return list(zip(self._starts, self._ends))

    def __len__(self) -> int:
        return sum(end - start for start, end in zip(self._starts, self._ends))

    def __contains__(self, position: int) -> bool:
        i = bisect.bisect_right(self._starts, position) - 1
        return i >= 0 and position < self._ends[i]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IntervalSet) and self.intervals() == other.intervals()

    def complement(self, size: int) -> IntervalSet:
        """Return the positions of [0, size) that are not in this set."""
        result = IntervalSet()
        cursor = 0
        for start, end in self.intervals():
            result.add_range(cursor, min(start, size))
            cursor = max(cursor, end)
        result.add_range(cursor, size)
        return result

    def __repr__(self) -> str:
        return f"IntervalSet({self.intervals()})"


class EpochPlan:
    """The global sequence G of one epoch: shuffled shard order, each shard rotated.

    Shard `order[i]` occupies G positions [starts[i], starts[i+1]) and lists its samples in file
    order starting at sample `rotations[order[i]]` and wrapping around at the shard's end.
    """

    def __init__(self, index: ShardIndex, seed: int, epoch: int):
        self.seed = seed
        self.epoch = epoch
        counts = np.array([shard.num_samples for shard in index.shards], dtype=np.int64)
        rng = rng_for(seed, epoch, _SHARD_ORDER_SALT)
        self.order = rng.permutation(len(counts))
        self.rotations = np.array([int(rng.integers(0, max(int(n), 1))) for n in counts])
        self.counts = counts
        self.starts = np.concatenate([[0], np.cumsum(counts[self.order])]).astype(np.int64)
        self.num_samples = int(self.starts[-1])

    def locate(self, position: int) -> tuple[int, int]:
        """Map a G position to (shard index in the shard index, sample index in file order)."""
        if not 0 <= position < self.num_samples:
            raise ValueError(f"position {position} is outside the epoch [0, {self.num_samples})")
        slot = int(np.searchsorted(self.starts, position, side="right")) - 1
        shard = int(self.order[slot])
        sample = (int(self.rotations[shard]) + position - int(self.starts[slot])) % int(
            self.counts[shard]
        )
        return shard, sample

    def split_points(self, start: int, end: int) -> list[int]:
        """Return the positions in (start, end) where a run must be cut: shard ends and wraps."""
        cuts = []
        slot = int(np.searchsorted(self.starts, start, side="right")) - 1
        while slot < len(self.order) and self.starts[slot] < end:
            shard = int(self.order[slot])
            shard_start = int(self.starts[slot])
            wrap = shard_start + int(self.counts[shard]) - int(self.rotations[shard])
            for cut in (wrap, int(self.starts[slot + 1])):
                if start < cut < end:
                    cuts.append(cut)
            slot += 1
        return sorted(set(cuts))


@dataclass
class Run:
    """Consecutive G positions [start, end) that are consecutive samples of one shard's file."""

    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


@dataclass
class PassLayout:
    """The spread of one pass over ranks and loader workers.

    `streams[rank][worker]` lists the runs that worker reads, in order. `real_counts` contains the
    number of real (non-padding) samples per rank, and every rank yields `num_batches` batches.
    """

    num_batches: int
    num_remaining: int
    num_dropped: int
    real_counts: list[int]
    streams: list[list[list[Run]]] = field(default_factory=list)


def cut_runs(plan: EpochPlan, remaining: IntervalSet, max_run_length: int) -> list[Run]:
    """Cut the remaining positions into runs of at most max_run_length in one shard's file order."""
    runs = []
    for start, end in remaining.intervals():
        bounds = [start, *plan.split_points(start, end), end]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            for run_start in range(lo, hi, max_run_length):
                runs.append(Run(run_start, min(run_start + max_run_length, hi)))
    return runs


def count_batches(num_remaining: int, world_size: int, batch_size: int, remainder: str) -> int:
    """Return the batches every rank yields for `num_remaining` samples under the remainder rule."""
    per_step = world_size * batch_size
    if remainder == "drop":
        return num_remaining // per_step
    if remainder == "pad":
        return math.ceil(num_remaining / per_step)
    raise ValueError(f"remainder={remainder!r} is not one of {REMAINDER_RULES}")


def worker_batches(num_batches: int, num_streams: int, stream: int) -> list[int]:
    """Return the rank's batch indices that worker `stream` produces (DataLoader's round-robin)."""
    return list(range(stream, num_batches, num_streams))


def batch_real_counts(real_count: int, num_batches: int, batch_size: int) -> list[int]:
    """Return the real samples in each of a rank's batches; padding is spread evenly over them.

    Spreading keeps at least floor(real_count / num_batches) real samples in every batch, so
    padding slots can duplicate real samples of their own batch.
    """
    if num_batches == 0:
        return []
    base, extra = divmod(real_count, num_batches)
    counts = [base + (1 if b < extra else 0) for b in range(num_batches)]
    if counts[0] > batch_size:
        raise ValueError(
            f"{real_count} samples do not fit in {num_batches} batches of {batch_size}"
        )
    return counts


def layout_pass(
    plan: EpochPlan,
    remaining: IntervalSet,
    world_size: int,
    num_workers: int,
    batch_size: int,
    remainder: str,
    max_run_length: int,
) -> PassLayout:
    """Deal the remaining positions of an epoch to world_size x max(num_workers, 1) streams.

    Drop rule: every rank gets floor(R / (W * B)) full batches and the last R mod (W * B) runs'
    samples in the shuffled run order are left for the next epoch. Pad rule: every rank gets
    ceil(R / (W * B)) batches, the real samples are split as evenly as possible over the ranks,
    and the missing slots are padding spread evenly over the rank's batches.
    """
    num_remaining = len(remaining)
    num_batches = count_batches(num_remaining, world_size, batch_size, remainder)
    if remainder == "drop":
        real_counts = [num_batches * batch_size] * world_size
    else:
        base, extra = divmod(num_remaining, world_size)
        real_counts = [base + (1 if r < extra else 0) for r in range(world_size)]
    num_dropped = num_remaining - sum(real_counts)

    streams_per_rank = max(num_workers, 1)
    needs = []
    for rank in range(world_size):
        for stream in range(streams_per_rank):
            counts = batch_real_counts(real_counts[rank], num_batches, batch_size)
            needs.append(
                sum(counts[b] for b in worker_batches(num_batches, streams_per_rank, stream))
            )

    runs = cut_runs(plan, remaining, max_run_length)
    order = rng_for(plan.seed, plan.epoch, _RUN_ORDER_SALT, num_remaining).permutation(len(runs))
    dealt: list[list[Run]] = [[] for _ in needs]
    cursor = 0
    for run_index in order:
        run = runs[run_index]
        while len(run) > 0:
            open_streams = [s for s in range(len(needs)) if needs[s] > 0]
            if not open_streams:
                break
            # Round-robin over streams that still need samples; a run larger than the need is split.
            target = min(open_streams, key=lambda s: (s - cursor) % len(needs))
            take = min(len(run), needs[target])
            dealt[target].append(Run(run.start, run.start + take))
            needs[target] -= take
            run = Run(run.start + take, run.end)
            cursor = (target + 1) % len(needs)
    streams = [dealt[r * streams_per_rank : (r + 1) * streams_per_rank] for r in range(world_size)]
    return PassLayout(num_batches, num_remaining, num_dropped, real_counts, streams)


def merge_runs(
    runs: list[Run], seed: int, epoch: int, rank: int, stream: int, open_runs: int
) -> list[tuple[int, int]]:
    """Interleave runs by a random k-way merge; return (run index, G position) in reading order.

    Up to `open_runs` runs are open at once. Each next sample comes from an open run chosen with
    probability proportional to the samples it has left, and the next run replaces a finished one.
    """
    rng = rng_for(seed, epoch, _MERGE_SALT, rank, stream)
    total = sum(len(run) for run in runs)
    draws = rng.random(total).tolist()
    order: list[tuple[int, int]] = []
    active: list[int] = []
    left: list[int] = []
    next_run = 0
    for draw in draws:
        while len(active) < open_runs and next_run < len(runs):
            active.append(next_run)
            left.append(len(runs[next_run]))
            next_run += 1
        # Walk the cumulative remaining counts to the run that the uniform draw falls into.
        target = draw * sum(left)
        pick = 0
        while pick < len(left) - 1 and target >= left[pick]:
            target -= left[pick]
            pick += 1
        run_index = active[pick]
        order.append((run_index, runs[run_index].end - left[pick]))
        left[pick] -= 1
        if left[pick] == 0:
            active.pop(pick)
            left.pop(pick)
    return order
