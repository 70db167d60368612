"""Epoch plans, interval sets, pass layouts and the k-way merge, checked against brute force."""

from __future__ import annotations

import random

import pytest

from ddn_dist.data.index import DatasetInfo, SampleEntry, ShardEntry, ShardIndex
from ddn_dist.data.plan import (
    EpochPlan,
    IntervalSet,
    batch_real_counts,
    count_batches,
    cut_runs,
    layout_pass,
    merge_runs,
    worker_batches,
)


def fake_index(sizes: list[int]) -> ShardIndex:
    shards = [
        ShardEntry(
            f"shard-{i}.tar", n, 0, "", [SampleEntry(f"{i}-{j}", 1024 * j, 1024) for j in range(n)]
        )
        for i, n in enumerate(sizes)
    ]
    info = DatasetInfo("fake", 8, 1, sum(sizes), False, 0, [0.5], [0.5])
    return ShardIndex(info, shards)


def positions_of(layout, rank=None) -> list[int]:
    ranks = range(len(layout.streams)) if rank is None else [rank]
    return [
        p
        for r in ranks
        for stream in layout.streams[r]
        for run in stream
        for p in range(run.start, run.end)
    ]


def test_interval_set_matches_python_set():
    rng = random.Random(0)
    members: set[int] = set()
    intervals = IntervalSet()
    for _ in range(300):
        start = rng.randrange(0, 200)
        end = start + rng.randrange(0, 8)
        intervals.add_range(start, end)
        members.update(range(start, end))
    assert set(p for a, b in intervals.intervals() for p in range(a, b)) == members
    assert len(intervals) == len(members)
    pairs = intervals.intervals()
    assert all(b1 < a2 for (_, b1), (a2, _) in zip(pairs, pairs[1:])), "intervals must not touch"
    complement = intervals.complement(210)
    assert (
        set(p for a, b in complement.intervals() for p in range(a, b)) == set(range(210)) - members
    )
    assert all((p in intervals) == (p in members) for p in range(-2, 212))


def test_epoch_plan_is_a_permutation():
    index = fake_index([5, 1, 9, 4])
    plan = EpochPlan(index, seed=7, epoch=3)
    pairs = [plan.locate(p) for p in range(plan.num_samples)]
    expected = {(s, j) for s, n in enumerate([5, 1, 9, 4]) for j in range(n)}
    assert set(pairs) == expected
    assert len(pairs) == len(expected)


def test_epoch_plan_depends_on_seed_and_epoch():
    index = fake_index([50, 50, 50, 50])
    orders = {
        (seed, epoch): [EpochPlan(index, seed, epoch).locate(p) for p in range(200)]
        for seed in (0, 1)
        for epoch in (0, 1)
    }
    assert orders[(0, 0)] == [EpochPlan(index, 0, 0).locate(p) for p in range(200)]
    assert len({tuple(order) for order in orders.values()}) == 4


def test_runs_stay_within_file_order():
    index = fake_index([7, 3, 11])
    plan = EpochPlan(index, seed=1, epoch=0)
    remaining = IntervalSet([(0, 4), (6, 21)])
    runs = cut_runs(plan, remaining, max_run_length=4)
    assert sum(len(run) for run in runs) == len(remaining)
    for run in runs:
        assert len(run) <= 4
        located = [plan.locate(p) for p in range(run.start, run.end)]
        shards = {shard for shard, _ in located}
        assert len(shards) == 1, f"run {run} spans shards {shards}"
        samples = [sample for _, sample in located]
        assert samples == list(range(samples[0], samples[0] + len(samples))), f"run {run} wraps"


@pytest.mark.parametrize(
    "world_size,num_workers,batch_size,remainder",
    [
        (1, 0, 5, "drop"),
        (2, 2, 4, "drop"),
        (3, 1, 7, "pad"),
        (3, 2, 4, "pad"),
        (4, 3, 2, "drop"),
        (2, 1, 16, "pad"),
    ],
)
def test_layout_partitions_remaining(world_size, num_workers, batch_size, remainder):
    index = fake_index([13, 2, 29, 8, 31])
    plan = EpochPlan(index, seed=5, epoch=2)
    consumed = IntervalSet([(3, 10), (40, 41), (50, 70)])
    remaining = consumed.complement(plan.num_samples)
    layout = layout_pass(
        plan, remaining, world_size, num_workers, batch_size, remainder, max_run_length=6
    )
    dealt = positions_of(layout)
    assert len(dealt) == len(set(dealt)), "a position was dealt twice"
    assert set(dealt) <= set(p for a, b in remaining.intervals() for p in range(a, b))
    assert len(dealt) + layout.num_dropped == len(remaining)
    per_step = world_size * batch_size
    if remainder == "drop":
        assert layout.num_batches == len(remaining) // per_step
        assert layout.num_dropped == len(remaining) % per_step
    else:
        assert layout.num_batches == -(-len(remaining) // per_step)
        assert layout.num_dropped == 0
    for rank in range(world_size):
        assert len(positions_of(layout, rank)) == layout.real_counts[rank]
        counts = batch_real_counts(layout.real_counts[rank], layout.num_batches, batch_size)
        assert len(counts) == layout.num_batches
        assert max(counts) <= batch_size
        streams = max(num_workers, 1)
        for stream in range(streams):
            need = sum(counts[b] for b in worker_batches(layout.num_batches, streams, stream))
            got = sum(len(run) for run in layout.streams[rank][stream])
            assert got == need, f"rank {rank} stream {stream} got {got} samples, needs {need}"


def test_count_batches_rejects_unknown_rule():
    with pytest.raises(ValueError, match="remainder='keep'"):
        count_batches(10, 2, 3, "keep")


def test_merge_is_a_permutation_of_runs():
    index = fake_index([40, 40, 40])
    plan = EpochPlan(index, seed=0, epoch=0)
    runs = cut_runs(plan, IntervalSet([(0, 120)]), max_run_length=10)
    order = merge_runs(runs, seed=0, epoch=0, rank=0, stream=0, open_runs=4)
    assert sorted(p for _, p in order) == list(range(120))
    for run_index, run in enumerate(runs):
        inside = [p for r, p in order if r == run_index]
        assert inside == list(range(run.start, run.end)), "a run must be read front to back"
    first_ten_runs = {r for r, _ in order[:10]}
    assert len(first_ten_runs) > 1, "the merge must interleave several runs"
