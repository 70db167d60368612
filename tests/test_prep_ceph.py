"""Data prep against a real Ceph RGW S3 store: all inputs, CLI, reruns, resume, parts and verify."""

import os
import subprocess
import sys
import zipfile

import pytest

from ddn_dist import storage
from ddn_dist.data.index import load_index
from ddn_dist.data.prep.jobs import PrepError, PrepOptions, run_prep
from ddn_dist.data.prep.verify import verify_dataset
from tests.fixtures.data import make_dataset_zip
from tests.test_prep_jobs import SMALL, InjectedCrash, crash_after, dataset_bytes

pytestmark = pytest.mark.ceph


def s3_tree(server, url):
    """Return {relative key: bytes} of every object under an s3:// prefix, without the manifests."""
    fs = server.filesystem()
    prefix = url[len("s3://") :].rstrip("/")
    return {
        path[len(prefix) + 1 :]: fs.cat_file(path)
        for path in fs.find(prefix)
        if not path[len(prefix) + 1 :].startswith("_prep/")
    }


def ddn(server, *args):
    return subprocess.run(
        [sys.executable, "-m", "ddn_dist.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **server.env()},
    )


def test_cli_digits_to_ceph_and_verify(s3_server):
    bucket = s3_server.make_bucket("cli")
    url = f"s3://{bucket}/digits"
    first = ddn(
        s3_server,
        "prep",
        "digits",
        "--out",
        url,
        "--endpoint-url",
        s3_server.endpoint_url,
        "--no-progress",
    )
    assert first.returncode == 0, first.stderr
    assert "1797 images, 2 shards (0 already present)" in first.stderr
    verify = ddn(
        s3_server, "prep", "verify", url, "--endpoint-url", s3_server.endpoint_url, "--decode"
    )
    assert verify.returncode == 0, verify.stderr
    assert "2 shards, 1797 samples" in verify.stderr
    objects = s3_tree(s3_server, url)
    rerun = ddn(s3_server, "prep", "digits", "--out", url, "--no-progress")
    assert rerun.returncode == 0, rerun.stderr
    assert "(2 already present)" in rerun.stderr
    assert s3_tree(s3_server, url) == objects


@pytest.mark.parametrize("kind", ["digits", "cifar10", "zip", "folder"])
def test_inputs_on_ceph_equal_local(s3_env, tmp_path, tiny_cifar, kind):
    inputs = {
        "digits": None,
        "cifar10": tiny_cifar[0],
        "zip": str(tmp_path / "set.zip"),
        "folder": str(tmp_path / "folder"),
    }
    make_dataset_zip(tmp_path / "set.zip", count=9)
    os.makedirs(inputs["folder"])
    with zipfile.ZipFile(inputs["zip"]) as archive:
        archive.extractall(inputs["folder"])
    options = dict(
        kind=kind, input_path=inputs[kind], max_images=60, shard_samples=7, progress=False
    )
    url = f"s3://{s3_env.make_bucket('inputs')}/{kind}"
    run_prep(PrepOptions(out=url, endpoint_url=s3_env.endpoint_url, **options))
    run_prep(PrepOptions(out=str(tmp_path / "local"), **options))
    remote = s3_tree(s3_env, url)
    assert remote == dataset_bytes(tmp_path / "local")
    assert load_index(url, s3_env.endpoint_url).dataset.has_labels


def test_resume_after_crash_on_ceph(s3_env, tmp_path, monkeypatch):
    url = f"s3://{s3_env.make_bucket('resume')}/digits"
    real_write = storage.write_bytes_atomic
    crash_after(monkeypatch, 4)
    with pytest.raises(InjectedCrash):
        run_prep(PrepOptions(out=url, endpoint_url=s3_env.endpoint_url, **SMALL))
    fs = s3_env.filesystem()
    assert not fs.exists(url[len("s3://") :] + "/index.json")
    monkeypatch.setattr(storage, "write_bytes_atomic", real_write)
    summary = run_prep(PrepOptions(out=url, endpoint_url=s3_env.endpoint_url, **SMALL))
    assert summary.shards_skipped_existing == 4
    run_prep(PrepOptions(out=str(tmp_path / "local"), **SMALL))
    assert s3_tree(s3_env, url) == dataset_bytes(tmp_path / "local")


def test_transient_upload_errors_retried(s3_env, tmp_path, monkeypatch):
    url = f"s3://{s3_env.make_bucket('retry')}/digits"
    fs, _ = storage.get_fs(url, s3_env.endpoint_url)
    real_pipe = fs.pipe_file
    failures = []

    def flaky_pipe(path, data, **kwargs):
        if path.endswith(".tar") and path not in failures:
            failures.append(path)
            raise OSError("503 ServiceUnavailable: injected before the upload")
        return real_pipe(path, data, **kwargs)

    monkeypatch.setattr(fs, "pipe_file", flaky_pipe)
    monkeypatch.setattr(storage.RetryPolicy, "base_delay_seconds", 0.01)
    summary = run_prep(PrepOptions(out=url, endpoint_url=s3_env.endpoint_url, **SMALL))
    assert len(failures) == 8
    assert summary.shards == 8
    run_prep(PrepOptions(out=str(tmp_path / "local"), **SMALL))
    assert s3_tree(s3_env, url) == dataset_bytes(tmp_path / "local")


def test_parts_on_ceph_equal_local_single_run(s3_env, tmp_path):
    url = f"s3://{s3_env.make_bucket('parts')}/digits"
    for part in range(2):
        run_prep(
            PrepOptions(
                out=url,
                endpoint_url=s3_env.endpoint_url,
                part=part,
                num_parts=2,
                workers=2,
                **SMALL,
            )
        )
    merge = subprocess.run(
        [sys.executable, "-m", "ddn_dist.cli", "prep", "merge-index", url],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **s3_env.env()},
    )
    assert merge.returncode == 0, merge.stderr
    run_prep(PrepOptions(out=str(tmp_path / "local"), **SMALL))
    assert s3_tree(s3_env, url) == dataset_bytes(tmp_path / "local")


def test_verify_on_ceph_catches_damage(s3_env):
    url = f"s3://{s3_env.make_bucket('verify')}/digits"
    run_prep(PrepOptions(out=url, endpoint_url=s3_env.endpoint_url, **SMALL))
    assert verify_dataset(url, s3_env.endpoint_url).ok
    fs = s3_env.filesystem()
    prefix = url[len("s3://") :]
    data = bytearray(fs.cat_file(f"{prefix}/shard-000001.tar"))
    data[5000] ^= 0x80
    fs.pipe_file(f"{prefix}/shard-000001.tar", bytes(data))
    fs.rm(f"{prefix}/shard-000007.tar")
    report = verify_dataset(url, s3_env.endpoint_url)
    assert len(report.failures) == 2
    assert report.failures[0].startswith("shard shard-000001.tar: sha256 is")
    assert report.failures[1].startswith("shard shard-000007.tar: missing")
    cli = subprocess.run(
        [sys.executable, "-m", "ddn_dist.cli", "prep", "verify", url],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **s3_env.env()},
    )
    assert cli.returncode == 1
    assert "shard-000007.tar: missing" in cli.stderr


def test_other_dataset_on_ceph_rejected(s3_env):
    url = f"s3://{s3_env.make_bucket('occupied')}/digits"
    run_prep(PrepOptions(out=url, endpoint_url=s3_env.endpoint_url, **SMALL))
    with pytest.raises(PrepError, match="already contains a different data set"):
        run_prep(
            PrepOptions(out=url, endpoint_url=s3_env.endpoint_url, **{**SMALL, "max_images": 200})
        )


def test_missing_bucket_error(s3_env):
    with pytest.raises(PrepError, match="bucket no-such-bucket not found"):
        run_prep(
            PrepOptions(out="s3://no-such-bucket/digits", endpoint_url=s3_env.endpoint_url, **SMALL)
        )


def test_wrong_secret_error(s3_env, monkeypatch):
    import s3fs

    url = f"s3://{s3_env.make_bucket('denied')}/digits"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    # Cached filesystems keep the credentials they were created with.
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        with pytest.raises(PrepError, match="access denied to S3 bucket"):
            run_prep(PrepOptions(out=url, endpoint_url=s3_env.endpoint_url, **SMALL))
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
