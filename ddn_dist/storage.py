"""Storage helpers over fsspec: local paths, `file://` and `s3://` (any S3-compatible endpoint).

Credentials come from the environment or the standard AWS configuration (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/credentials) through s3fs; this module never reads,
logs or stores them. The endpoint of an S3-compatible store comes from the `endpoint_url`
argument, else from AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import logging
import os
import posixpath
import random
import time
import uuid
from dataclasses import dataclass
from typing import Callable, TypeVar

import fsspec

log = logging.getLogger(__name__)
T = TypeVar("T")


def endpoint_from_env() -> str | None:
    """Return the S3 endpoint URL set in the environment, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def storage_options_for(url: str, endpoint_url: str | None = None) -> dict:
    """Return the fsspec storage options for `url` (only the endpoint; credentials stay in s3fs)."""
    if not url.startswith("s3://"):
        return {}
    endpoint = endpoint_url or endpoint_from_env()
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}


def get_fs(url: str, endpoint_url: str | None = None):
    """Return (filesystem, path) for a URL or plain path."""
    fs, path = fsspec.core.url_to_fs(url, **storage_options_for(url, endpoint_url))
    return fs, path


def join_url(base: str, name: str) -> str:
    """Join a file name onto a directory URL or path, keeping the scheme."""
    if "://" in base:
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


def dirname_url(url: str) -> str:
    """Return the directory part of a URL or path."""
    if "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://{posixpath.dirname(rest)}"
    return os.path.dirname(os.path.abspath(url))


class TransientStorageError(OSError):
    """A storage error worth retrying (5xx, connection reset, timeout, throttling)."""


def is_transient(error: BaseException) -> bool:
    """Return True when `error` is a storage failure that a retry may cure."""
    if isinstance(error, (TransientStorageError, ConnectionError, TimeoutError)):
        return True
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return False
    text = f"{type(error).__name__} {error}"
    markers = ("500", "502", "503", "504", "SlowDown", "RequestTimeout", "InternalError",
               "ServiceUnavailable", "Connection reset", "ConnectionReset", "timed out", "Timeout",
               "ClientPayloadError", "ServerDisconnected", "IncompleteRead", "EndpointConnectionError")
    return any(marker in text for marker in markers)


@dataclass
class RetryPolicy:
    """Exponential backoff with full jitter for transient storage errors."""

    attempts: int = 6
    base_delay_seconds: float = 0.2
    max_delay_seconds: float = 10.0

    def call(self, fn: Callable[[], T], what: str, on_retry: Callable[[BaseException], None] | None = None) -> T:
        """Call `fn`, retrying transient errors; re-raise the last error when attempts run out."""
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except Exception as error:  # noqa: BLE001 - classified below, re-raised if not transient
                if not is_transient(error) or attempt == self.attempts:
                    raise
                delay = random.uniform(0, min(self.max_delay_seconds, self.base_delay_seconds * 2**attempt))
                log.warning("%s failed (attempt %d/%d): %s; retrying in %.2f s",
                            what, attempt, self.attempts, error, delay)
                if on_retry is not None:
                    on_retry(error)
                time.sleep(delay)
        raise AssertionError("unreachable")


def write_bytes_atomic(url: str, data: bytes, endpoint_url: str | None = None,
                       retry: RetryPolicy | None = None) -> None:
    """Write `data` so that `url` either does not exist or contains all of it.

    Local files are written to a temporary name in the same directory, fsynced and renamed. An S3
    PUT (or a completed multipart upload) is atomic by itself: the object appears only when whole.
    """
    fs, path = get_fs(url, endpoint_url)
    retry = retry or RetryPolicy()
    if "://" not in url or url.startswith("file://"):
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    retry.call(lambda: fs.pipe_file(path, data), f"upload of {url}")


def read_bytes(url: str, endpoint_url: str | None = None, start: int | None = None,
               end: int | None = None, retry: RetryPolicy | None = None) -> bytes:
    """Read a whole object, or the byte range [start, end), retrying transient errors."""
    fs, path = get_fs(url, endpoint_url)
    retry = retry or RetryPolicy()
    if start is None and end is None:
        return retry.call(lambda: fs.cat_file(path), f"read of {url}")
    return retry.call(lambda: fs.cat_file(path, start=start, end=end), f"read of {url} [{start}:{end})")


class MissingCredentialsError(PermissionError):
    """No S3 credentials were found in the environment or the AWS configuration."""


def require_credentials(url: str) -> None:
    """Raise MissingCredentialsError for an `s3://` URL when botocore finds no credentials.

    botocore searches the usual chain: environment variables, AWS_PROFILE and the shared config
    files, then container and instance metadata (unless AWS_EC2_METADATA_DISABLED=true).
    """
    if not url.startswith("s3://"):
        return
    import botocore.session

    if botocore.session.get_session().get_credentials() is None:
        raise MissingCredentialsError(
            f"no S3 credentials found for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            f"(or AWS_PROFILE with ~/.aws/credentials)"
        )
