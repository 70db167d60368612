"""Verification of a prepared data set: every shard re-read and checked against the index.

Each shard must exist, and its size and sha256 must match the index. Its tar members must be
exactly the listed samples in order (`<key>.png`, plus `<key>.cls` when the data set is labelled).
Every sample's byte range [offset, offset + length) must parse as a tar stream of its own.
Optionally every PNG is decoded and its size and mode checked against the data set facts.
"""

from __future__ import annotations

import hashlib
import io
import logging
import sys
import tarfile
from dataclasses import dataclass, field

from PIL import Image
from tqdm import tqdm

from ddn_dist import storage
from ddn_dist.data import index as index_mod

log = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    """Result of `verify_dataset`: what was checked and one message per failing shard."""

    index_url: str
    shards_total: int = 0
    shards_checked: int = 0
    samples_checked: int = 0
    bytes_checked: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def _members(data: bytes) -> list[tuple[str, int, int]]:
    """List (name, header offset, end offset of padded data) for each tar member."""
    members = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        for info in archive:
            end = info.offset_data + -(-info.size // 512) * 512
            members.append((info.name, info.offset, end))
    return members


def _check_sample_range(
    data: bytes, sample: index_mod.SampleEntry, expected: list[str]
) -> str | None:
    """Check that the sample's byte range is a tar stream of exactly the expected members."""
    chunk = data[sample.offset : sample.offset + sample.length]
    try:
        names = [name for name, _, _ in _members(chunk)]
    except tarfile.TarError as error:
        end = sample.offset + sample.length
        return f"sample {sample.key}: bytes [{sample.offset}, {end}) are not a tar stream ({error})"
    if names != expected:
        return f"sample {sample.key}: its byte range holds members {names}, expected {expected}"
    return None


def _check_image(
    data: bytes, sample: index_mod.SampleEntry, info: index_mod.DatasetInfo
) -> str | None:
    chunk = data[sample.offset : sample.offset + sample.length]
    with tarfile.open(fileobj=io.BytesIO(chunk), mode="r:") as archive:
        handle = archive.extractfile(f"{sample.key}.png")
        png = handle.read() if handle else b""
    try:
        image = Image.open(io.BytesIO(png))
        image.load()
    except OSError as error:
        return f"sample {sample.key}: PNG does not decode ({error})"
    mode = "L" if info.channels == 1 else "RGB"
    if image.size != (info.resolution, info.resolution) or image.mode != mode:
        return (
            f"sample {sample.key}: image is {image.size[0]}x{image.size[1]} {image.mode}, "
            f"expected {info.resolution}x{info.resolution} {mode}"
        )
    return None


def verify_shard(
    data: bytes,
    shard: index_mod.ShardEntry,
    info: index_mod.DatasetInfo,
    decode_images: bool = False,
) -> list[str]:
    """Check one shard's bytes against its index entry and return the problems found."""
    if len(data) != shard.num_bytes:
        return [f"size is {len(data)} bytes, the index says {shard.num_bytes}"]
    digest = hashlib.sha256(data).hexdigest()
    if digest != shard.sha256:
        return [f"sha256 is {digest}, the index says {shard.sha256}"]
    try:
        members = _members(data)
    except tarfile.TarError as error:
        return [f"not a readable tar file ({error})"]
    problems = []
    suffixes = [".png", ".cls"] if info.has_labels else [".png"]
    position = 0
    for sample in shard.samples:
        expected = [sample.key + suffix for suffix in suffixes]
        found = members[position : position + len(expected)]
        if [name for name, _, _ in found] != expected:
            problems.append(
                f"sample {sample.key}: members {[n for n, _, _ in found]}, expected {expected}"
            )
            break
        start, end = found[0][1], found[-1][2]
        if (sample.offset, sample.length) != (start, end - start):
            problems.append(
                f"sample {sample.key}: index gives offset {sample.offset} length {sample.length}, "
                f"the tar has offset {start} length {end - start}"
            )
        else:
            problem = _check_sample_range(data, sample, expected)
            if problem is None and decode_images:
                problem = _check_image(data, sample, info)
            if problem:
                problems.append(problem)
        position += len(expected)
    if not problems and position != len(members):
        problems.append(
            f"{len(members) - position} tar member(s) not listed in the index, "
            f"first {members[position][0]!r}"
        )
    return problems


def verify_dataset(
    location: str,
    endpoint_url: str | None = None,
    decode_images: bool = False,
    progress: bool | None = None,
) -> VerifyReport:
    """Re-read every shard of the data set at `location` and check it against the index.

    Raise index_mod.IndexError_ when the index itself is missing or inconsistent. Shard problems
    do not raise: they are collected in the report, one message per failing shard.
    """
    storage.require_credentials(location)
    index_url = index_mod.index_url_for(location)
    index = index_mod.load_index(location, endpoint_url)
    report = VerifyReport(index_url=index_url, shards_total=len(index.shards))
    seen_keys: set[str] = set()
    show = sys.stderr.isatty() if progress is None else progress
    for shard in tqdm(index.shards, unit="shard", disable=not show, desc="verify"):
        url = index_mod.shard_url(index_url, shard)
        try:
            data = storage.read_bytes(url, endpoint_url)
        except FileNotFoundError:
            report.failures.append(f"shard {shard.url}: missing ({url})")
            continue
        problems = verify_shard(data, shard, index.dataset, decode_images)
        duplicates = [s.key for s in shard.samples if s.key in seen_keys]
        if duplicates:
            problems.append(f"key {duplicates[0]} also appears in an earlier shard")
        seen_keys.update(s.key for s in shard.samples)
        report.shards_checked += 1
        report.samples_checked += shard.num_samples
        report.bytes_checked += len(data)
        if problems:
            report.failures.append(f"shard {shard.url}: " + "; ".join(problems[:3]))
    for failure in report.failures:
        log.error("verify %s: %s", index_url, failure)
    return report
