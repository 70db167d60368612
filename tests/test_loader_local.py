"""The streaming loader on local shards in one process: exactness, resume, padding, faults."""

from __future__ import annotations

import collections
import os
import shutil

import numpy as np
import pytest
import torch

from ddn_dist.data.index import load_index
from ddn_dist.data.loader import (
    DataCorruptionError,
    LoaderConfig,
    MissingShardError,
    StreamingLoader,
    read_audit,
)
from tests.test_loader_support import all_keys, digits_arrays, write_shards

UNEVEN_SIZES = [300, 17, 400, 1, 250, 529, 300]


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory) -> str:
    """The digits as 7 very uneven shards written by the test's own writer; keys end in the row."""
    out = str(tmp_path_factory.mktemp("uneven-shards"))
    images, labels = digits_arrays()
    write_shards(out, images, labels, UNEVEN_SIZES)
    return out


def consume(loader: StreamingLoader, max_batches: int | None = None, step0: int = 0):
    """Iterate and mark batches; return (valid keys, batches) with an optional early stop."""
    keys, batches = [], []
    for batch in loader:
        if max_batches is not None and len(batches) >= max_batches:
            break
        loader.mark_consumed(batch, step0 + len(batches))
        keys += [key for key, ok in zip(batch.keys, batch.valid.tolist()) if ok]
        batches.append(batch)
    return keys, batches


@pytest.mark.parametrize("num_workers", [0, 2])
def test_epoch_delivers_each_sample_once(digits_shards, num_workers):
    index = load_index(digits_shards)
    loader = StreamingLoader(
        LoaderConfig(digits_shards, batch_size=32, num_workers=num_workers, remainder="pad")
    )
    assert loader.batches_remaining() == -(-1797 // 32)
    keys, batches = consume(loader)
    counts = collections.Counter(keys)
    assert set(counts) == set(all_keys(index))
    assert max(counts.values()) == 1
    assert len(batches) == -(-1797 // 32)
    assert all(batch.images.shape == (32, 1, 8, 8) for batch in batches)
    assert loader.counters()["padded"] == len(batches) * 32 - 1797
    assert loader.counters()["samples_consumed"] == 1797
    assert loader.batches_remaining() == -(-1797 // 32), "the next pass is a whole epoch"
    loader.close()


def test_images_and_labels_match_source(uneven_shards):
    images, labels = digits_arrays()
    loader = StreamingLoader(LoaderConfig(uneven_shards, batch_size=50, num_workers=2))
    _, batches = consume(loader, max_batches=6)
    checked = 0
    for batch in batches:
        for i, key in enumerate(batch.keys):
            row = int(key.rsplit("-", 1)[1])
            expected = torch.from_numpy(images[row]).float() / 127.5 - 1.0
            assert torch.equal(batch.images[i, 0], expected), f"pixels of {key}"
            assert batch.labels[i].item() == labels[row], f"label of {key}"
            checked += 1
    assert checked == 300
    assert batches[0].images.dtype == torch.float32
    loader.close()


def test_world_size_three_in_one_process(uneven_shards):
    # Ranks need torch.distributed only for state_dict, so three ranks can run one after another.
    all_rank_keys = []
    num_batches = []
    for rank in range(3):
        loader = StreamingLoader(
            LoaderConfig(uneven_shards, batch_size=16, num_workers=1, seed=4),
            rank=rank,
            world_size=3,
        )
        keys, batches = consume(loader)
        all_rank_keys += keys
        num_batches.append(len(batches))
        assert loader.counters()["dropped"] in (1797 % 48 // 3, 1797 % 48 // 3 + 1)
        loader.close()
    assert num_batches == [1797 // 48] * 3
    counts = collections.Counter(all_rank_keys)
    assert max(counts.values()) == 1
    assert len(counts) == 1797 // 48 * 48


def test_resume_other_worker_count_is_exact(uneven_shards):
    config = LoaderConfig(uneven_shards, batch_size=20, num_workers=2, seed=9, remainder="pad")
    first = StreamingLoader(config)
    keys_before, _ = consume(first, max_batches=7)
    state = first.state_dict()
    first.close()
    consumed = sum(end - start for start, end in state["consumed"])
    assert consumed == 7 * 20, "samples read ahead by workers must not count as consumed"
    assert state["epoch"] == 0

    second = StreamingLoader(
        LoaderConfig(uneven_shards, batch_size=20, num_workers=0, seed=9, remainder="pad")
    )
    second.load_state_dict(state)
    assert second.batches_remaining() == -(-(1797 - 140) // 20)
    keys_after, _ = consume(second)
    counts = collections.Counter(keys_before + keys_after)
    assert len(counts) == 1797
    assert max(counts.values()) == 1
    second.close()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_same_layout_repeats_batches(uneven_shards, num_workers):
    config = LoaderConfig(uneven_shards, batch_size=20, num_workers=num_workers, seed=4)
    uninterrupted = StreamingLoader(config)
    _, expected = consume(uninterrupted)
    uninterrupted.close()

    first = StreamingLoader(config)
    consume(first, max_batches=11)
    state = first.state_dict()
    first.close()
    resumed = StreamingLoader(config)
    resumed.load_state_dict(state)
    assert resumed.batches_remaining() == len(expected) - 11
    _, after = consume(resumed)
    resumed.close()

    assert [batch.keys for batch in after] == [batch.keys for batch in expected[11:]]
    for got, want in zip(after, expected[11:]):
        assert torch.equal(got.images, want.images)


def test_resume_reads_only_unconsumed_bytes(uneven_shards):
    index = load_index(uneven_shards)
    config = LoaderConfig(uneven_shards, batch_size=25, num_workers=0, seed=2, remainder="pad")
    first = StreamingLoader(config)
    keys_before, _ = consume(first, max_batches=40)
    state = first.state_dict()
    resumed = StreamingLoader(config)
    resumed.load_state_dict(state)
    consume(resumed)
    unconsumed_bytes = sum(
        sample.length
        for shard in index.shards
        for sample in shard.samples
        if sample.key not in set(keys_before)
    )
    assert resumed.counters()["bytes_read"] == unconsumed_bytes


def test_persistent_workers_follow_epochs(uneven_shards):
    config = LoaderConfig(
        uneven_shards,
        batch_size=64,
        num_workers=2,
        persistent_workers=True,
        seed=1,
        remainder="pad",
    )
    loader = StreamingLoader(config)
    epoch0, _ = consume(loader)
    epoch1, _ = consume(loader)
    assert loader.epoch == 1
    assert sorted(epoch0) == sorted(epoch1) == sorted(set(epoch0))
    assert epoch0 != epoch1, "each epoch has its own order"
    loader.close()

    fresh = StreamingLoader(
        LoaderConfig(uneven_shards, batch_size=64, num_workers=2, seed=1, remainder="pad")
    )
    fresh.load_state_dict({**fresh.state_dict(), "epoch": 1})
    expected1, _ = consume(fresh)
    assert epoch1 == expected1, "persistent workers must read the plan of the new epoch"
    fresh.close()


def test_drop_rule_counts_left_over(uneven_shards):
    loader = StreamingLoader(LoaderConfig(uneven_shards, batch_size=100, num_workers=0))
    keys, batches = consume(loader)
    assert len(batches) == 17
    assert len(keys) == 1700
    assert loader.counters()["dropped"] == 97
    assert loader.counters()["padded"] == 0
    assert all(bool(batch.valid.all()) for batch in batches)


def test_pad_rule_marks_duplicates_invalid(uneven_shards):
    loader = StreamingLoader(
        LoaderConfig(uneven_shards, batch_size=100, num_workers=0, remainder="pad"),
        rank=1,
        world_size=2,
    )
    keys, batches = consume(loader)
    assert len(batches) == 9
    assert len(keys) == 1797 // 2
    assert loader.counters()["padded"] == 900 - 1797 // 2
    invalid = sum(int((~batch.valid).sum()) for batch in batches)
    assert invalid == 900 - 1797 // 2
    for batch in batches:
        padding = batch.positions < 0
        assert torch.equal(padding, ~batch.valid)
        for i in padding.nonzero().flatten().tolist():
            assert batch.keys[i] in batch.keys[:i] + batch.keys[i + 1 :], (
                "padding duplicates a sample"
            )


def truncated_copy(source: str, destination: str, shard_number: int, cut_sample: int) -> list[str]:
    """Copy shards and cut one shard inside sample `cut_sample`; return the keys lost."""
    shutil.copytree(source, destination)
    index = load_index(destination)
    shard = index.shards[shard_number]
    cut = shard.samples[cut_sample].offset + shard.samples[cut_sample].length // 2
    with open(os.path.join(destination, shard.url), "r+b") as f:
        f.truncate(cut)
    return [sample.key for sample in shard.samples[cut_sample:]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_truncated_shard_skip_counts(uneven_shards, tmp_path, num_workers):
    lost = truncated_copy(uneven_shards, str(tmp_path / "cut"), shard_number=2, cut_sample=350)
    loader = StreamingLoader(
        LoaderConfig(str(tmp_path / "cut"), batch_size=32, num_workers=num_workers, remainder="pad")
    )
    keys, batches = consume(loader)
    assert loader.counters()["corrupt_skipped"] == len(lost) == 50
    assert set(keys).isdisjoint(lost)
    assert len(keys) == len(set(keys)) == 1797 - 50
    assert len(batches) == -(-1797 // 32)
    for batch in batches:
        skipped = (batch.positions >= 0) & ~batch.valid
        for i in skipped.nonzero().flatten().tolist():
            assert batch.keys[i] not in lost, "a skipped slot holds a valid duplicate"
    loader.close()


def test_truncated_shard_raise_names_shard(uneven_shards, tmp_path):
    lost = truncated_copy(uneven_shards, str(tmp_path / "cut"), shard_number=5, cut_sample=0)
    loader = StreamingLoader(
        LoaderConfig(str(tmp_path / "cut"), batch_size=32, num_workers=2, on_corrupt="raise")
    )
    with pytest.raises(DataCorruptionError) as error:
        consume(loader)
    assert "shard-00005.tar" in str(error.value)
    assert any(key in str(error.value) for key in lost)


def test_corrupt_png_is_skipped(uneven_shards, tmp_path):
    shutil.copytree(uneven_shards, tmp_path / "bad")
    index = load_index(str(tmp_path / "bad"))
    sample = index.shards[0].samples[10]
    with open(tmp_path / "bad" / index.shards[0].url, "r+b") as f:
        f.seek(sample.offset + 512 + 20)  # inside the PNG data, after the first tar header
        f.write(b"\xff" * 40)
    loader = StreamingLoader(
        LoaderConfig(str(tmp_path / "bad"), batch_size=32, num_workers=0, remainder="pad")
    )
    keys, _ = consume(loader)
    assert loader.counters()["corrupt_skipped"] == 1
    assert sample.key not in keys
    assert len(keys) == 1796


def test_missing_shard_fails_at_start(uneven_shards, tmp_path):
    shutil.copytree(uneven_shards, tmp_path / "gone")
    os.remove(tmp_path / "gone" / "shard-00003.tar")
    with pytest.raises(MissingShardError, match="1 were not found: .*shard-00003.tar"):
        StreamingLoader(LoaderConfig(str(tmp_path / "gone"), batch_size=8))


def test_state_from_other_seed_or_data_is_rejected(uneven_shards, digits_shards):
    loader = StreamingLoader(LoaderConfig(uneven_shards, batch_size=8, num_workers=0, seed=1))
    state = loader.state_dict()
    other_seed = StreamingLoader(LoaderConfig(uneven_shards, batch_size=8, num_workers=0, seed=2))
    with pytest.raises(ValueError, match="set seed=1"):
        other_seed.load_state_dict(state)
    other_data = StreamingLoader(LoaderConfig(digits_shards, batch_size=8, num_workers=0, seed=1))
    with pytest.raises(ValueError, match="another data set"):
        other_data.load_state_dict(state)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("remainder", "keep", "remainder='keep' is invalid"),
        ("on_corrupt", "ignore", "on_corrupt='ignore' is invalid"),
        ("batch_size", 0, "batch_size=0 is invalid"),
        ("num_workers", -1, "num_workers=-1 is invalid"),
    ],
)
def test_config_rejects_bad_values(uneven_shards, field, value, message):
    with pytest.raises(ValueError, match=message):
        StreamingLoader(LoaderConfig(uneven_shards, **{field: value}))


def test_audit_records_consumed_keys(uneven_shards, tmp_path):
    audit_dir = str(tmp_path / "audit")
    loader = StreamingLoader(
        LoaderConfig(uneven_shards, batch_size=30, num_workers=2, audit_dir=audit_dir),
        rank=1,
        world_size=2,
    )
    keys, _ = consume(loader, max_batches=5, step0=100)
    loader.close()
    with open(os.path.join(audit_dir, "rank1.jsonl"), "a") as f:
        f.write('{"rank": 1, "step": 105, "ep')  # a run killed in the middle of a line
    records = read_audit(audit_dir)
    assert [record.key for record in records] == keys
    assert {record.rank for record in records} == {1}
    assert [record.step for record in records] == [100 + i // 30 for i in range(150)]
    assert {record.epoch for record in records} == {0}

    reopened = StreamingLoader(
        LoaderConfig(uneven_shards, batch_size=30, num_workers=0, audit_dir=audit_dir),
        rank=1,
        world_size=2,
    )
    more, _ = consume(reopened, max_batches=1, step0=200)
    reopened.close()
    assert [record.key for record in read_audit(audit_dir)] == keys + more


def test_shuffle_mixes_shards(uneven_shards):
    # Adjacent samples of a batch come from the same shard about as often as in a uniform shuffle.
    index = load_index(uneven_shards)
    shard_of = {s.key: n for n, shard in enumerate(index.shards) for s in shard.samples}
    sizes = np.array(UNEVEN_SIZES, dtype=np.float64)
    uniform = float(((sizes / sizes.sum()) ** 2).sum())
    loader = StreamingLoader(LoaderConfig(uneven_shards, batch_size=32, num_workers=2, seed=3))
    _, batches = consume(loader)
    pairs = [
        (shard_of[a], shard_of[b]) for batch in batches for a, b in zip(batch.keys, batch.keys[1:])
    ]
    same = sum(a == b for a, b in pairs) / len(pairs)
    assert same < uniform * 1.5 + 0.05, f"same-shard neighbours {same:.3f}, uniform {uniform:.3f}"


def test_broken_loop_continues_same_epoch(uneven_shards):
    # Leaving the loop early (workers have read ahead) and iterating again continues the epoch.
    loader = StreamingLoader(
        LoaderConfig(
            uneven_shards,
            batch_size=32,
            num_workers=2,
            persistent_workers=True,
            seed=6,
            remainder="pad",
        )
    )
    first, _ = consume(loader, max_batches=10)
    assert loader.batches_remaining() == -(-1797 // 32) - 10
    rest, _ = consume(loader, step0=10)
    assert loader.epoch == 0
    counts = collections.Counter(first + rest)
    assert len(counts) == 1797
    assert max(counts.values()) == 1
    assert loader.state_dict()["epoch"] == 1
    next_epoch, _ = consume(loader)
    assert loader.epoch == 1
    assert sorted(next_epoch) == sorted(counts)
    loader.close()
