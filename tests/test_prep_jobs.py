"""Data prep jobs on local disk: determinism, workers, parts, resume, overwrite and verify."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from sklearn.datasets import load_digits

from ddn_dist import storage
from ddn_dist.data.index import load_index
from ddn_dist.data.prep import jobs
from ddn_dist.data.prep.jobs import PrepError, PrepOptions, merge_index, run_prep
from ddn_dist.data.prep.verify import verify_dataset

# 300 digits in shards of 40: 7 full shards and one of 20, quick enough to run many times.
SMALL = dict(kind="digits", max_images=300, shard_samples=40, progress=False)


def tree_bytes(root):
    """Return {relative path: bytes} of every file under `root`."""
    files = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


def dataset_bytes(root):
    """Return the bytes of index.json and the shards (the part manifests depend on the split)."""
    return {k: v for k, v in tree_bytes(root).items() if not k.startswith(jobs.PREP_DIR)}


def test_rerun_byte_identical(tmp_path):
    run_prep(PrepOptions(out=str(tmp_path / "a"), **SMALL))
    run_prep(PrepOptions(out=str(tmp_path / "b"), **SMALL))
    first = tree_bytes(tmp_path / "a")
    assert len([name for name in first if name.endswith(".tar")]) == 8
    assert first == tree_bytes(tmp_path / "b")


def test_two_workers_equal_one(tmp_path):
    run_prep(PrepOptions(out=str(tmp_path / "one"), **SMALL))
    summary = run_prep(PrepOptions(out=str(tmp_path / "two"), workers=2, **SMALL))
    assert summary.images == 300
    assert summary.shards == 8
    assert tree_bytes(tmp_path / "one") == tree_bytes(tmp_path / "two")


def test_parts_merged_equal_single_run(tmp_path):
    run_prep(PrepOptions(out=str(tmp_path / "single"), **SMALL))
    parts = str(tmp_path / "parts")
    for part in (2, 0, 1):
        summary = run_prep(PrepOptions(out=parts, part=part, num_parts=3, **SMALL))
        assert summary.index_url is None
    assert not os.path.exists(os.path.join(parts, "index.json"))
    merge_index(parts)
    assert dataset_bytes(tmp_path / "single") == dataset_bytes(parts)


def test_merge_names_missing_part(tmp_path):
    out = str(tmp_path / "parts")
    run_prep(PrepOptions(out=out, part=0, num_parts=3, **SMALL))
    run_prep(PrepOptions(out=out, part=2, num_parts=3, **SMALL))
    with pytest.raises(PrepError, match=r"parts 1/3 have no manifest"):
        merge_index(out)
    assert not os.path.exists(os.path.join(out, "index.json"))


def test_mean_std_exact(tmp_path):
    out = str(tmp_path / "out")
    run_prep(PrepOptions(out=out, **SMALL))
    pixels = np.rint(load_digits().images[:300] * 255 / 16).astype(np.float64) / 255
    info = load_index(out).dataset
    assert info.mean[0] == pytest.approx(pixels.mean(), rel=1e-13)
    assert info.std[0] == pytest.approx(pixels.std(), rel=1e-12)


def test_shard_bytes_limit_splits_chunks(tmp_path):
    limit = 30 * 1024
    out = str(tmp_path / "out")
    run_prep(PrepOptions(out=out, shard_bytes=limit, **SMALL))
    index = load_index(out)
    assert index.dataset.num_samples == 300
    assert len(index.shards) > 8
    # tarfile pads an archive to a 10240-byte record, so the file may exceed the member bytes.
    assert all(s.samples[-1].offset + s.samples[-1].length + 1024 <= limit for s in index.shards)
    assert "shard-000000-01.tar" in [s.url for s in index.shards]
    keys = [e.key for s in index.shards for e in s.samples]
    assert keys == [f"{i:06d}" for i in range(300)]
    run_prep(PrepOptions(out=str(tmp_path / "two"), shard_bytes=limit, workers=2, **SMALL))
    assert tree_bytes(out) == tree_bytes(tmp_path / "two")


class InjectedCrash(RuntimeError):
    pass


def crash_after(monkeypatch, shards):
    """Make the shard upload raise after `shards` shard writes (index and manifests unaffected)."""
    real = storage.write_bytes_atomic
    calls = []

    def flaky(url, data, endpoint_url=None, retry=None):
        if url.endswith(".tar"):
            calls.append(url)
            if len(calls) > shards:
                raise InjectedCrash(f"crash while writing {url}")
        return real(url, data, endpoint_url, retry)

    monkeypatch.setattr(storage, "write_bytes_atomic", flaky)
    return calls


def test_resume_after_crash(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    real_write = storage.write_bytes_atomic
    crash_after(monkeypatch, 3)
    with pytest.raises(InjectedCrash):
        run_prep(PrepOptions(out=out, **SMALL))
    assert not os.path.exists(os.path.join(out, "index.json"))
    monkeypatch.setattr(storage, "write_bytes_atomic", real_write)
    # A temporary file left by a write killed mid-way must not be taken for a shard.
    with open(os.path.join(out, ".shard-000003.tar.tmp-dead0000"), "wb") as f:
        f.write(b"partial")
    summary = run_prep(PrepOptions(out=out, **SMALL))
    assert summary.shards_skipped_existing == 3
    assert summary.shards == 8
    run_prep(PrepOptions(out=str(tmp_path / "clean"), **SMALL))
    assert dataset_bytes(out) == dataset_bytes(tmp_path / "clean")
    assert verify_dataset(out).ok


def test_resume_rewrites_damaged_shard(tmp_path):
    out = str(tmp_path / "out")
    run_prep(PrepOptions(out=out, **SMALL))
    good = tree_bytes(out)
    with open(os.path.join(out, "shard-000002.tar"), "r+b") as f:
        f.seek(600)
        f.write(b"\xff")
    os.remove(os.path.join(out, "shard-000005.tar"))
    summary = run_prep(PrepOptions(out=out, **SMALL))
    assert summary.shards_skipped_existing == 6
    assert tree_bytes(out) == good


def test_resume_after_killed_process(tmp_path):
    """SIGKILL a real `ddn prep` process once some shards exist, then rerun it."""
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "ddn_dist.cli",
        "prep",
        "digits",
        "--out",
        str(out),
        "--shard-samples",
        "10",
        "--no-progress",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while process.poll() is None and len(list(out.glob("shard-*.tar"))) < 5:
            time.sleep(0.02)
    finally:
        process.kill()
        process.wait()
    written_before = len(list(out.glob("shard-*.tar")))
    assert written_before >= 5
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"({written_before} already present)" in result.stderr
    assert load_index(str(out)).dataset.num_samples == 1797
    assert verify_dataset(str(out)).ok


def test_other_dataset_rejected_then_overwritten(tmp_path):
    out = str(tmp_path / "out")
    run_prep(PrepOptions(out=out, **SMALL))
    changed = {**SMALL, "shard_samples": 100}
    with pytest.raises(PrepError, match="already contains a different data set.*--overwrite"):
        run_prep(PrepOptions(out=out, **changed))
    assert load_index(out).shards[0].num_samples == 40
    run_prep(PrepOptions(out=out, overwrite=True, **changed))
    assert sorted(n for n in os.listdir(out) if n.endswith(".tar")) == [
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
    assert load_index(out).shards[0].num_samples == 100
    assert verify_dataset(out).ok


def test_verify_catches_flipped_byte_and_missing_shard(tmp_path):
    out = str(tmp_path / "out")
    run_prep(PrepOptions(out=out, **SMALL))
    assert verify_dataset(out, decode_images=True).ok
    path = os.path.join(out, "shard-000004.tar")
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[len(data) // 3] ^= 0x01
    with open(path, "wb") as f:
        f.write(bytes(data))
    os.remove(os.path.join(out, "shard-000006.tar"))
    report = verify_dataset(out)
    assert not report.ok
    assert len(report.failures) == 2
    assert report.failures[0].startswith("shard shard-000004.tar: sha256 is")
    assert report.failures[1].startswith("shard shard-000006.tar: missing")


def test_verify_catches_wrong_offset(tmp_path):
    out = str(tmp_path / "out")
    run_prep(PrepOptions(out=out, **SMALL))
    index_path = os.path.join(out, "index.json")
    with open(index_path) as f:
        raw = json.load(f)
    raw["shards"][1]["samples"][3]["offset"] += 512
    with open(index_path, "w") as f:
        json.dump(raw, f)
    report = verify_dataset(out)
    assert len(report.failures) == 1
    assert "shard-000001.tar: sample 000043: index gives offset" in report.failures[0]


def test_cli_verify_exit_status(tmp_path, digits_shards):
    ok = subprocess.run(
        [sys.executable, "-m", "ddn_dist.cli", "prep", "verify", digits_shards],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert "9 shards, 1797 samples" in ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "ddn_dist.cli", "prep", "verify", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 1
    assert "no shard index at" in bad.stderr


def test_missing_credentials_error(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    # Keep botocore off instance metadata and away from any real configuration.
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "missing-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "missing-credentials"))
    with pytest.raises(storage.MissingCredentialsError, match="set AWS_ACCESS_KEY_ID"):
        run_prep(PrepOptions(out="s3://bucket/digits", endpoint_url="http://127.0.0.1:9", **SMALL))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(shard_samples=0), "invalid --shard-samples 0"),
        (dict(workers=0), "invalid --workers 0"),
        (dict(part=3, num_parts=3), "invalid --part 3/3"),
        (dict(on_error="ignore"), "invalid --on-error 'ignore'"),
        (dict(resolution=-4), "invalid resolution -4"),
    ],
)
def test_invalid_options_rejected(tmp_path, options, message):
    merged = {**SMALL, **options}
    with pytest.raises(PrepError, match=message):
        run_prep(PrepOptions(out=str(tmp_path / "out"), **merged))


def test_shard_count_hint(caplog):
    from ddn_dist.data.prep.output import hint_shard_count

    with caplog.at_level("WARNING"):
        hint_shard_count(70_000, 70)
        hint_shard_count(70_000, 512)
        hint_shard_count(10_000, 10)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "70000 images in 70 shards" in message
    assert "needs at least 512 shards" in message
    assert "pass --shard-samples 136 or less" in message
