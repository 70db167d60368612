"""The streaming loader in real multi-process jobs (torch.distributed gloo) on local shards."""

from __future__ import annotations

import collections

import pytest

from ddn_dist.data.index import load_index
from tests.test_loader_support import all_keys, launch

pytestmark = [pytest.mark.slow]


def test_local_stop_at_two_resume_at_three(digits_shards, tmp_path):
    index = load_index(digits_shards)
    config = {
        "data": digits_shards,
        "batch_size": 24,
        "num_workers": 0,
        "seed": 21,
        "remainder": "pad",
    }
    first = launch(2, {"config": config, "max_steps": 9}, str(tmp_path / "ws2"))
    assert [r["steps"] for r in first] == [9, 9]
    assert first[0]["state"] == first[1]["state"]
    before = [key for r in first for key in r["keys"]]
    assert len(before) == len(set(before)) == 2 * 9 * 24
    state = first[0]["state"]
    assert sum(end - start for start, end in state["consumed"]) == len(before)

    resumed = launch(
        3, {"config": {**config, "num_workers": 1}, "state": state}, str(tmp_path / "ws3")
    )
    expected_batches = -(-(1797 - len(before)) // (3 * 24))
    assert [r["steps"] for r in resumed] == [expected_batches] * 3
    assert sum(r["counters"]["padded"] for r in resumed) == expected_batches * 72 - (
        1797 - len(before)
    )
    counts = collections.Counter(before + [key for r in resumed for key in r["keys"]])
    assert max(counts.values()) == 1
    assert set(counts) == set(all_keys(index))


def test_local_two_ranks_full_epoch(digits_shards, tmp_path):
    config = {"data": digits_shards, "batch_size": 40, "num_workers": 2, "seed": 2}
    results = launch(2, {"config": config}, str(tmp_path / "ws2"))
    assert [r["steps"] for r in results] == [1797 // 80] * 2
    keys = [key for r in results for key in r["keys"]]
    assert len(keys) == len(set(keys)) == 1797 // 80 * 80
    assert results[0]["state"] == results[1]["state"]
    assert results[0]["state"]["epoch"] == 1
    assert results[0]["state"]["consumed"] == []
