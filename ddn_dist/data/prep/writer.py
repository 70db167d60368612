"""Deterministic WebDataset tar shards: PNG encoding, tar layout, pixel statistics and upload.

Every shard is built in memory, so its sha256 and the byte range of each sample are known before
anything is written. The shard then reaches its final name in one atomic write (an S3 PUT, or a
local temporary file renamed into place). Tar members carry fixed metadata (mtime 0, uid/gid 0,
empty owner names, mode 0644, ustar format), so the same samples always give the same bytes.
"""

from __future__ import annotations

import glob
import hashlib
import io
import logging
import os
import tarfile
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ddn_dist import storage
from ddn_dist.data.index import SampleEntry, ShardEntry

log = logging.getLogger(__name__)

PNG_COMPRESS_LEVEL = 6
TAR_BLOCK_BYTES = 512
TAR_END_BYTES = 2 * TAR_BLOCK_BYTES


def encode_png(pixels: np.ndarray) -> bytes:
    """Encode uint8 (H, W) or (H, W, 3) pixels as PNG with fixed settings (no metadata chunks)."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(
        buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False
    )
    return buffer.getvalue()


@dataclass
class PixelStats:
    """Exact per-channel sums of uint8 pixel values, as Python ints so any split adds up the same."""

    channels: int
    count: int = 0
    sums: list[int] = field(default_factory=list)
    square_sums: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sums = self.sums or [0] * self.channels
        self.square_sums = self.square_sums or [0] * self.channels

    def add(self, pixels: np.ndarray) -> None:
        """Add one image, uint8 (H, W) or (H, W, C)."""
        flat = pixels.reshape(-1, self.channels).astype(np.int64)
        self.count += flat.shape[0]
        for c in range(self.channels):
            self.sums[c] += int(flat[:, c].sum())
            self.square_sums[c] += int((flat[:, c] * flat[:, c]).sum())

    def merge(self, other: "PixelStats") -> None:
        """Add the sums of `other` (same channel count) into this one."""
        if other.channels != self.channels:
            raise ValueError(
                f"cannot merge statistics of {other.channels} and {self.channels} channels"
            )
        self.count += other.count
        self.sums = [a + b for a, b in zip(self.sums, other.sums)]
        self.square_sums = [a + b for a, b in zip(self.square_sums, other.square_sums)]

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Return per-channel mean and population std of pixels scaled to [0, 1]."""
        if self.count == 0:
            return [0.0] * self.channels, [0.0] * self.channels
        means, stds = [], []
        for total, square_total in zip(self.sums, self.square_sums):
            means.append(total / (255.0 * self.count))
            # n * sum(x^2) - sum(x)^2 is an exact integer, so no cancellation error.
            variance_numerator = self.count * square_total - total * total
            stds.append(
                float(np.sqrt(variance_numerator / (255.0 * 255.0 * self.count * self.count)))
            )
        return means, stds

    def to_dict(self) -> dict:
        return {
            "channels": self.channels,
            "count": self.count,
            "sums": self.sums,
            "square_sums": self.square_sums,
        }

    @classmethod
    def from_dict(cls, raw: dict) -> "PixelStats":
        return cls(
            channels=raw["channels"],
            count=raw["count"],
            sums=list(raw["sums"]),
            square_sums=list(raw["square_sums"]),
        )


@dataclass
class EncodedSample:
    """One sample ready for a shard: key, PNG bytes and class (None when unlabelled)."""

    key: str
    png: bytes
    label: int | None


def _member_bytes(payload_bytes: int) -> int:
    """Bytes one tar member takes: a 512-byte header plus data padded to a 512-byte boundary."""
    return TAR_BLOCK_BYTES + -(-payload_bytes // TAR_BLOCK_BYTES) * TAR_BLOCK_BYTES


def sample_tar_bytes(sample: EncodedSample) -> int:
    """Bytes a sample takes inside a tar shard (its byte-range length in the index)."""
    size = _member_bytes(len(sample.png))
    if sample.label is not None:
        size += _member_bytes(len(str(sample.label)))
    return size


def _add_member(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    archive.addfile(info, io.BytesIO(payload))


def build_shard_tar(samples: list[EncodedSample]) -> tuple[bytes, list[SampleEntry]]:
    """Build a tar shard in memory; return its bytes and each sample's (offset, length)."""
    buffer = io.BytesIO()
    entries = []
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for sample in samples:
            offset = buffer.tell()
            _add_member(archive, f"{sample.key}.png", sample.png)
            if sample.label is not None:
                _add_member(archive, f"{sample.key}.cls", str(sample.label).encode())
            entries.append(
                SampleEntry(key=sample.key, offset=offset, length=buffer.tell() - offset)
            )
    return buffer.getvalue(), entries


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def existing_matches(
    url: str, data: bytes, endpoint_url: str | None, retry: storage.RetryPolicy
) -> bool:
    """Return True when an object already at `url` has exactly the bytes `data`.

    The size is compared first. On S3 the ETag of a single-part upload is the MD5 of the object,
    which settles it without a download. Otherwise the object is read back and its sha256 compared.
    """
    fs, path = storage.get_fs(url, endpoint_url)
    try:
        info = retry.call(lambda: fs.info(path), f"stat of {url}")
    except FileNotFoundError:
        return False
    if int(info.get("size", -1)) != len(data):
        return False
    etag = str(info.get("ETag", "")).strip('"')
    if etag and "-" not in etag and len(etag) == 32:
        return etag == hashlib.md5(data, usedforsecurity=False).hexdigest()
    existing = storage.read_bytes(url, endpoint_url, retry=retry)
    return sha256_hex(existing) == sha256_hex(data)


def remove_stale_temporaries(url: str) -> None:
    """Delete temporary files that a killed local write of `url` left behind.

    `storage.write_bytes_atomic` writes `.<name>.tmp-<random>` next to the target; S3 has no such
    leftovers because an interrupted PUT never creates the object.
    """
    if "://" in url and not url.startswith("file://"):
        return
    path = url.removeprefix("file://")
    pattern = os.path.join(os.path.dirname(path), f".{glob.escape(os.path.basename(path))}.tmp-*")
    for stale in glob.glob(pattern):
        log.info("removing %s, left by an interrupted write", stale)
        os.remove(stale)


@dataclass
class ShardResult:
    """A shard as written (or found intact): its index entry, pixel sums and what happened."""

    entry: ShardEntry
    stats: PixelStats
    skipped_existing: bool


def write_shard(
    url: str,
    name: str,
    samples: list[EncodedSample],
    stats: PixelStats,
    endpoint_url: str | None,
    retry: storage.RetryPolicy,
) -> ShardResult:
    """Build one shard; upload it to `url` unless an identical object is already there."""
    remove_stale_temporaries(url)
    data, entries = build_shard_tar(samples)
    entry = ShardEntry(
        url=name,
        num_samples=len(entries),
        num_bytes=len(data),
        sha256=sha256_hex(data),
        samples=entries,
    )
    if existing_matches(url, data, endpoint_url, retry):
        log.debug("shard %s already present with sha256 %s; skipped", url, entry.sha256)
        return ShardResult(entry, stats, skipped_existing=True)
    storage.write_bytes_atomic(url, data, endpoint_url, retry=retry)
    return ShardResult(entry, stats, skipped_existing=False)
