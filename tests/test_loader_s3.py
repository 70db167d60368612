"""The streaming loader against Ceph RGW: exactly-once at world sizes 1-3, resume, faults."""

from __future__ import annotations

import collections

import pytest

from ddn_dist.data.index import load_index
from ddn_dist.data.loader import LoaderConfig, MissingShardError, StreamingLoader
from tests.test_loader_support import all_keys, launch

pytestmark = [pytest.mark.ceph]

DIGITS = 1797


def consume_all(loader: StreamingLoader) -> list[str]:
    keys = []
    for step, batch in enumerate(loader):
        loader.mark_consumed(batch, step)
        keys += [key for key, ok in zip(batch.keys, batch.valid.tolist()) if ok]
    return keys


def test_s3_world_size_one_exact(s3_env, digits_s3_shards):
    index = load_index(digits_s3_shards)
    loader = StreamingLoader(
        LoaderConfig(digits_s3_shards, batch_size=32, num_workers=2, remainder="pad")
    )
    keys = consume_all(loader)
    assert collections.Counter(keys) == collections.Counter(all_keys(index))
    counters = loader.counters()
    sample_bytes = sum(sample.length for shard in index.shards for sample in shard.samples)
    assert counters["bytes_read"] == sample_bytes, "each sample's bytes are read exactly once"
    loader.close()


@pytest.mark.slow
def test_s3_resume_two_to_one_and_three(s3_env, digits_s3_shards, tmp_path):
    index = load_index(digits_s3_shards)
    config = {
        "data": digits_s3_shards,
        "batch_size": 16,
        "num_workers": 2,
        "seed": 11,
        "remainder": "pad",
    }
    first = launch(2, {"config": config, "max_steps": 20}, str(tmp_path / "ws2"))
    assert [r["steps"] for r in first] == [20, 20]
    assert first[0]["state"] == first[1]["state"], "state_dict must be identical on every rank"
    consumed_before = [key for r in first for key in r["keys"]]
    assert len(consumed_before) == 2 * 20 * 16
    state = first[0]["state"]
    assert sum(end - start for start, end in state["consumed"]) == len(consumed_before)

    # World size 1 needs no process group, so it resumes in this process.
    single = StreamingLoader(LoaderConfig(**{**config, "num_workers": 1}))
    single.load_state_dict(state)
    assert single.batches_remaining() == -(-(DIGITS - len(consumed_before)) // 16)
    keys = consumed_before + consume_all(single)
    assert sorted(keys) == sorted(all_keys(index)), "resume at world size 1 must finish the epoch"
    assert single.state_dict()["epoch"] == 1, "a finished epoch rolls over"
    single.close()

    resumed = launch(
        3, {"config": {**config, "num_workers": 0}, "state": state}, str(tmp_path / "ws3")
    )
    expected_batches = -(-(DIGITS - len(consumed_before)) // (16 * 3))
    assert [r["steps"] for r in resumed] == [expected_batches] * 3
    assert [r["batches_at_start"] for r in resumed] == [expected_batches] * 3
    keys = consumed_before + [key for r in resumed for key in r["keys"]]
    counts = collections.Counter(keys)
    assert max(counts.values()) == 1, "duplicates after resume at world size 3"
    assert set(counts) == set(all_keys(index)), "samples lost after resume at world size 3"
    assert all(r["state"]["epoch"] == 1 for r in resumed), "a finished epoch rolls over"


@pytest.mark.slow
def test_s3_world_size_three_uneven_equal_batches(s3_env, digits_s3_shards, tmp_path):
    # 9 shards (8 x 200 + 197) over 3 ranks x 1 worker, drop rule: equal batch counts, no repeats.
    config = {"data": digits_s3_shards, "batch_size": 20, "num_workers": 1, "seed": 5}
    results = launch(3, {"config": config}, str(tmp_path / "ws3"))
    assert [r["steps"] for r in results] == [DIGITS // 60] * 3
    keys = [key for r in results for key in r["keys"]]
    assert len(keys) == len(set(keys)) == DIGITS // 60 * 60
    assert sum(r["counters"]["dropped"] for r in results) == DIGITS % 60


def test_s3_missing_shard_fails_at_start(s3_env, s3_server, digits_s3_shards):
    fs = s3_server.filesystem()
    bucket = s3_server.make_bucket("loader-missing")
    source = digits_s3_shards[len("s3://") :]
    index = load_index(digits_s3_shards)
    for name in ("index.json", index.shards[0].url):
        fs.copy(f"{source}/{name}", f"{bucket}/digits/{name}")
    with pytest.raises(MissingShardError, match=f"{len(index.shards) - 1} were not found"):
        StreamingLoader(LoaderConfig(f"s3://{bucket}/digits", batch_size=8))


def test_s3_faults_lose_nothing(s3_env, digits_s3_shards, faulty_proxy):
    index = load_index(digits_s3_shards)
    faulty_proxy.stall_seconds = 5.0
    config = LoaderConfig(
        digits_s3_shards,
        endpoint_url=faulty_proxy.endpoint_url,
        batch_size=32,
        num_workers=2,
        remainder="pad",
        max_run_length=8,
        read_timeout_seconds=2.0,
        connect_timeout_seconds=2.0,
        retry_base_delay_seconds=0.01,
        retry_max_delay_seconds=0.1,
    )
    loader = StreamingLoader(config)
    keys = consume_all(loader)
    assert collections.Counter(keys) == collections.Counter(all_keys(index))
    injected = faulty_proxy.fault_count(".tar")
    assert injected >= 10, f"only {injected} faults were injected; the test would prove little"
    assert {kind for kind, _ in faulty_proxy.faults} == {"503", "500", "reset", "stall"}
    counters = loader.counters()
    # A read that is slow without an injected stall on a loaded machine also times out and is
    # retried, so the counters can exceed the injected faults but never fall short of them.
    assert counters["retries"] >= injected
    assert counters["errors"] == counters["retries"], "every failed attempt was retried"
    assert counters["corrupt_skipped"] == 0
    loader.close()
