"""Ranged reads of shard byte ranges, tar parsing, PNG decoding, retries and read counters.

One ranged read fetches the bytes of a run of consecutive samples of one shard (an S3 ranged GET
for `s3://` URLs, a seek and read for local files), so samples before the run are never
downloaded. Each sample's byte range is a tar stream on its own, which webdataset's tar iterator
parses. A sample whose bytes are missing or do not parse or decode is reported as corrupt.
"""

from __future__ import annotations

import io
import logging
import random
import threading
import time
from dataclasses import dataclass, fields

import numpy as np
import torch
from PIL import Image
from webdataset.tariterators import tar_file_iterator

from ddn_dist import storage
from ddn_dist.data.index import ShardEntry, ShardIndex, shard_url

log = logging.getLogger(__name__)

# Error texts of storage failures that a retry may cure, beyond those storage.is_transient matches.
_EXTRA_TRANSIENT_MARKERS = (
    "ClientOSError",
    "ConnectionError",
    "reset by peer",
    "Broken pipe",
    "ServerDisconnected",
    "ReadTimeout",
    "ConnectTimeout",
    "FSTimeoutError",
    "ResponseParserError",
    "HTTPClientError",
)


class DataCorruptionError(RuntimeError):
    """A sample's bytes are missing, truncated or undecodable and on_corrupt is "raise"."""


class MissingShardError(FileNotFoundError):
    """A shard listed in the index does not exist in the store."""


@dataclass
class ReadCounters:
    """Storage and decoding counters of one process since its last report."""

    bytes_read: int = 0
    retries: int = 0
    errors: int = 0
    corrupt_skipped: int = 0

    def add(self, other: ReadCounters) -> None:
        """Add every counter of `other` to this one."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


@dataclass
class Sample:
    """One decoded sample; `image` is (C, H, W) uint8, `label` is -1 when unlabelled."""

    key: str
    image: torch.Tensor
    label: int


@dataclass
class RawSample:
    """The undecoded tar bytes of one sample and the URL of its shard."""

    key: str
    url: str
    data: bytes


@dataclass
class CorruptSample:
    """A sample that could not be read, with the reason."""

    key: str
    reason: str


def _error_chain(error: BaseException) -> list[BaseException]:
    # s3fs turns botocore's ClientError into OSError and keeps the original as __cause__.
    chain, seen = [], set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _http_status(error: BaseException) -> tuple[int | None, str]:
    response = getattr(error, "response", None)
    if not isinstance(response, dict):
        return None, ""
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status, str(response.get("Error", {}).get("Code", ""))


def is_retryable(error: BaseException) -> bool:
    """Return True when a storage error is transient (5xx, 408, 429, reset, timeout, slow read)."""
    for item in _error_chain(error):
        status, code = _http_status(item)
        if status is not None and (status >= 500 or status in (408, 429)):
            return True
        if code in ("SlowDown", "RequestTimeout", "ServiceUnavailable", "InternalError"):
            return True
        if storage.is_transient(item):
            return True
        text = f"{type(item).__name__} {item}"
        if any(marker in text for marker in _EXTRA_TRANSIENT_MARKERS):
            return True
    return False


def _is_range_not_satisfiable(error: BaseException) -> bool:
    for item in _error_chain(error):
        status, code = _http_status(item)
        if status == 416 or code == "InvalidRange":
            return True
    return False


@dataclass
class ReaderOptions:
    """Shard read options: endpoint, timeouts in seconds and the retry policy."""

    endpoint_url: str | None = None
    connect_timeout_seconds: float = 10.0
    read_timeout_seconds: float = 30.0
    retry_attempts: int = 8
    retry_base_delay_seconds: float = 0.05
    retry_max_delay_seconds: float = 5.0


_aio_session = None


def _shared_aio_session():
    # One botocore session per process tree, because it caches the parsed S3 service model. Loader
    # workers forked after the main process used it skip that parse, which took about 1 s per
    # worker on a loaded 2-core machine against Ceph RGW on 127.0.0.1.
    global _aio_session
    if _aio_session is None:
        import aiobotocore.session

        _aio_session = aiobotocore.session.AioSession()
    return _aio_session


def open_filesystem(url: str, options: ReaderOptions):
    """Return (filesystem, path) for `url` with timeouts set and client-side retries off.

    s3fs and botocore retries are switched off so that every retry goes through the loader's
    own policy and is counted.
    """
    if not url.startswith("s3://"):
        return storage.get_fs(url, options.endpoint_url)
    import s3fs

    endpoint = options.endpoint_url or storage.endpoint_from_env()
    fs = s3fs.S3FileSystem(
        endpoint_url=endpoint,
        session=_shared_aio_session(),
        skip_instance_cache=True,
        config_kwargs={
            "connect_timeout": options.connect_timeout_seconds,
            "read_timeout": options.read_timeout_seconds,
            "retries": {"total_max_attempts": 1, "mode": "standard"},
        },
    )
    fs.retries = 1
    return fs, url[len("s3://") :]


class ShardReader:
    """Reads runs of samples from the shards of one index; safe to use from several threads."""

    def __init__(self, index: ShardIndex, index_url: str, options: ReaderOptions):
        self.index = index
        self.index_url = index_url
        self.options = options
        self.counters = ReadCounters()
        self._lock = threading.Lock()
        self._fs = None
        self._mode = "L" if index.dataset.channels == 1 else "RGB"

    def take_counters(self) -> ReadCounters:
        """Return the counters gathered since the last call and reset them."""
        with self._lock:
            taken, self.counters = self.counters, ReadCounters()
        return taken

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, value in deltas.items():
                setattr(self.counters, name, getattr(self.counters, name) + value)

    def _filesystem(self):
        # Created on first use in the process that reads, so forked loader workers get their own.
        with self._lock:
            if self._fs is None:
                self._fs = open_filesystem(self.index_url, self.options)[0]
        return self._fs

    def shard_path(self, shard: ShardEntry) -> tuple[str, str]:
        """Return (URL, filesystem path) of a shard."""
        url = shard_url(self.index_url, shard)
        return url, (url[len("s3://") :] if url.startswith("s3://") else storage.get_fs(url)[1])

    def fetch_range(self, shard: ShardEntry, start: int, end: int) -> bytes:
        """Read bytes [start, end) of a shard with retries; fewer bytes come back past its end."""
        url, path = self.shard_path(shard)
        fs = self._filesystem()

        # NOTE: a run is one GET, so a failure after part of the body arrived retries the whole
        # range; runs are short (max_run_length samples), which bounds the bytes read again.
        what = f"read of {url} bytes [{start}, {end})"
        for attempt in range(1, self.options.retry_attempts + 1):
            try:
                data = fs.cat_file(path, start=start, end=end)
            except FileNotFoundError as error:
                raise MissingShardError(
                    f"shard {url} listed in {self.index_url} was not found; restore it or rerun "
                    f"data prep"
                ) from error
            except Exception as error:
                # A range that starts past the end of a truncated object gets S3 status 416.
                if _is_range_not_satisfiable(error):
                    data = b""
                else:
                    self._count(errors=1)
                    if not is_retryable(error) or attempt == self.options.retry_attempts:
                        log.error(
                            "%s failed (attempt %d of %d): %s: %s",
                            what,
                            attempt,
                            self.options.retry_attempts,
                            type(error).__name__,
                            error,
                        )
                        raise
                    delay = random.uniform(
                        0,
                        min(
                            self.options.retry_max_delay_seconds,
                            self.options.retry_base_delay_seconds * 2**attempt,
                        ),
                    )
                    log.warning(
                        "%s failed (attempt %d of %d): %s: %s; retrying in %.2f s",
                        what,
                        attempt,
                        self.options.retry_attempts,
                        type(error).__name__,
                        error,
                        delay,
                    )
                    self._count(retries=1)
                    time.sleep(delay)
                    continue
            self._count(bytes_read=len(data))
            return data
        raise AssertionError("unreachable: the last attempt returns or raises")

    def read_samples(
        self, shard_index: int, first: int, count: int
    ) -> list[RawSample | CorruptSample]:
        """Read samples [first, first + count) of a shard in file order with one ranged read.

        The bytes are not decoded here, so a caller decodes each sample only when it needs it.
        """
        shard = self.index.shards[shard_index]
        entries = shard.samples[first : first + count]
        start = entries[0].offset
        end = entries[-1].offset + entries[-1].length
        data = self.fetch_range(shard, start, end)
        url = self.shard_path(shard)[0]
        results: list[RawSample | CorruptSample] = []
        for entry in entries:
            lo = entry.offset - start
            hi = lo + entry.length
            if hi > len(data):
                results.append(
                    CorruptSample(
                        entry.key,
                        (
                            f"truncated sample {entry.key!r}: shard {url} ends before its bytes "
                            f"[{entry.offset}, {entry.offset + entry.length})"
                        ),
                    )
                )
                continue
            results.append(RawSample(entry.key, url, data[lo:hi]))
        return results

    def decode(self, data: bytes, key: str, url: str) -> Sample | CorruptSample:
        """Parse one sample's tar members and decode its PNG and class, or return a CorruptSample."""
        try:
            members = {}
            for member in tar_file_iterator(io.BytesIO(data)):
                name = member["fname"]
                if not name.startswith(key + "."):
                    raise ValueError(f"tar member {name!r} does not belong to sample {key!r}")
                members[name[len(key) + 1 :]] = member["data"]
            if "png" not in members:
                raise ValueError(f"sample {key!r} has no .png member (members: {sorted(members)})")
            image = self._decode_png(members["png"])
            label = int(members["cls"].decode()) if "cls" in members else -1
            return Sample(key, image, label)
        except Exception as error:  # noqa: BLE001 - any parse or decode failure marks it corrupt
            return CorruptSample(
                key, f"undecodable sample {key!r} in {url}: {type(error).__name__}: {error}"
            )

    def _decode_png(self, data: bytes) -> torch.Tensor:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.format != "PNG":
                raise ValueError(f"image is {image.format}, expected PNG")
            array = np.array(image.convert(self._mode))
        resolution = self.index.dataset.resolution
        if array.shape[0] != resolution or array.shape[1] != resolution:
            raise ValueError(
                f"image is {array.shape[1]}x{array.shape[0]}, the index expects "
                f"{resolution}x{resolution}"
            )
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array.transpose(2, 0, 1).copy())


def check_shards_exist(reader: ShardReader) -> None:
    """Raise MissingShardError listing every shard of the index that the store lacks.

    One listing per shard directory is enough. A size that differs from the index is only logged,
    because reading decides per sample (by on_corrupt) what a truncated shard means.
    """
    by_directory: dict[str, list[tuple[str, str, ShardEntry]]] = {}
    for shard in reader.index.shards:
        url, path = reader.shard_path(shard)
        by_directory.setdefault(storage.dirname_url(url), []).append((url, path, shard))
    fs = reader._filesystem()
    missing = []
    for directory, shards in by_directory.items():
        directory_path = shards[0][1].rsplit("/", 1)[0]
        try:
            listing = fs.ls(directory_path, detail=True, refresh=True)
        except FileNotFoundError:
            listing = []
        sizes = {entry["name"].rstrip("/"): entry.get("size") for entry in listing}
        for url, path, shard in shards:
            size = sizes.get(path.rstrip("/"))
            if size is None:
                missing.append(url)
            elif size != shard.num_bytes:
                log.warning(
                    "shard %s has %d bytes but the index lists %d; samples past its end "
                    "will be treated as corrupt",
                    url,
                    size,
                    shard.num_bytes,
                )
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise MissingShardError(
            f"shard index {reader.index_url} lists {len(reader.index.shards)} shards but "
            f"{len(missing)} were not found: {shown}; restore them or rerun data prep"
        )
