"""Mirror of complete checkpoints in object storage (`s3://`, any fsspec URL or a local path).

The mirror has the local layout: `<mirror>/<tag>/...`, `<mirror>/<tag>/COMPLETE.json` and
`<mirror>/latest_complete`. Uploads put every data file first, then the marker, then the pointer,
so a reader that trusts only markers never takes a partial upload for a complete one. Deletes
remove the marker first for the same reason.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import posixpath
import shutil
import uuid
from dataclasses import asdict

from ddn_dist.checkpointing.layout import (
    MARKER_NAME,
    POINTER_NAME,
    CompleteMarker,
    fsync_path,
    parse_marker,
    verify_files,
    write_marker,
)
from ddn_dist.storage import RetryPolicy, get_fs

log = logging.getLogger(__name__)


class CheckpointMirror:
    """Uploads, finds, downloads and prunes checkpoints under one mirror URL."""

    def __init__(self, url: str, endpoint_url: str | None = None, retry: RetryPolicy | None = None):
        self.url = url.rstrip("/")
        self.fs, self.base = get_fs(self.url, endpoint_url)
        self.base = self.base.rstrip("/")
        self.retry = retry or RetryPolicy()
        self.is_local = "file" in (
            self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        )

    def _remote(self, *parts: str) -> str:
        return posixpath.join(self.base, *parts)

    def _put_file(self, local_path: str, remote_path: str) -> None:
        if self.is_local:
            os.makedirs(os.path.dirname(remote_path), exist_ok=True)
        self.retry.call(
            lambda: self.fs.put_file(local_path, remote_path), f"upload of {remote_path}"
        )

    def _put_text(self, remote_path: str, text: str) -> None:
        if self.is_local:
            os.makedirs(os.path.dirname(remote_path), exist_ok=True)
        data = text.encode("utf-8")
        self.retry.call(lambda: self.fs.pipe_file(remote_path, data), f"upload of {remote_path}")

    def _read_text(self, remote_path: str) -> str | None:
        try:
            data = self.retry.call(lambda: self.fs.cat_file(remote_path), f"read of {remote_path}")
        except FileNotFoundError:
            return None
        return data.decode("utf-8")

    def upload(self, local_dir: str, marker: CompleteMarker) -> None:
        """Upload a complete checkpoint directory: data files, then its marker, then the pointer."""
        old_marker = self._remote(marker.tag, MARKER_NAME)
        if self.retry.call(lambda: self.fs.exists(old_marker), f"lookup of {old_marker}"):
            # An older upload of the same tag must not look complete while its files are replaced.
            self.retry.call(lambda: self.fs.rm_file(old_marker), f"delete of {old_marker}")
        for relative in marker.files:
            self._put_file(os.path.join(local_dir, relative), self._remote(marker.tag, relative))
        self._put_text(self._remote(marker.tag, MARKER_NAME), json.dumps(asdict(marker), indent=1))
        self._put_text(self._remote(POINTER_NAME), marker.tag + "\n")
        self.fs.invalidate_cache()
        log.info(
            "mirrored checkpoint %s (%d bytes) to %s/%s",
            marker.tag,
            marker.total_bytes,
            self.url,
            marker.tag,
        )

    def _valid_marker(self, tag: str) -> CompleteMarker | None:
        text = self._read_text(self._remote(tag, MARKER_NAME))
        if text is None:
            return None
        marker = parse_marker(text, f"{self.url}/{tag}/{MARKER_NAME}")
        if marker is None:
            return None
        try:
            listing = self.retry.call(
                lambda: self.fs.find(self._remote(tag), detail=True), f"listing of {self.url}/{tag}"
            )
        except FileNotFoundError:
            return None
        prefix = self._remote(tag) + "/"
        sizes = {
            path[len(prefix) :]: int(info["size"])
            for path, info in listing.items()
            if path.startswith(prefix)
        }
        wrong = [name for name, size in marker.files.items() if sizes.get(name) != size]
        if wrong:
            log.warning(
                "mirrored checkpoint %s/%s is incomplete (%d files missing or of another "
                "size, first %s); ignoring it",
                self.url,
                tag,
                len(wrong),
                wrong[0],
            )
            return None
        return marker

    def tags(self) -> list[str]:
        """Return the names of the checkpoint folders in the mirror, complete or not."""
        self.fs.invalidate_cache()
        try:
            entries = self.retry.call(
                lambda: self.fs.ls(self.base, detail=True), f"listing of {self.url}"
            )
        except FileNotFoundError:
            return []
        names = [
            posixpath.basename(e["name"].rstrip("/"))
            for e in entries
            if e.get("type") == "directory"
        ]
        return sorted(n for n in names if not n.startswith("."))

    def newest(self) -> CompleteMarker | None:
        """Return the marker of the newest complete mirrored checkpoint, or None."""
        self.fs.invalidate_cache()
        pointed = self._read_text(self._remote(POINTER_NAME))
        if pointed is not None and pointed.strip():
            marker = self._valid_marker(pointed.strip())
            if marker is not None:
                return marker
        markers = [m for m in (self._valid_marker(tag) for tag in self.tags()) if m]
        return max(markers, key=lambda m: m.sequence) if markers else None

    def download(self, marker: CompleteMarker, root: str) -> str:
        """Download a mirrored checkpoint into `<root>/<tag>` and return that directory.

        Files land in a scratch directory first. The marker is written after their sizes check out,
        and then the directory is renamed into place, so a broken download never looks complete.
        """
        scratch = os.path.join(root, f".download-{marker.tag}-{uuid.uuid4().hex[:8]}")
        staged = os.path.join(scratch, marker.tag)
        final = os.path.join(root, marker.tag)
        try:
            for relative in marker.files:
                local_path = os.path.join(staged, relative)
                os.makedirs(os.path.dirname(local_path), exist_ok=True)
                remote_path = self._remote(marker.tag, relative)
                self.retry.call(
                    functools.partial(self.fs.get_file, remote_path, local_path),
                    f"download of {remote_path}",
                )
                fsync_path(local_path)
            problems = verify_files(staged, marker)
            if problems:
                raise OSError(f"download of {self.url}/{marker.tag} is incomplete: {problems[0]}")
            write_marker(staged, marker)
            if os.path.exists(final):
                shutil.rmtree(final)
            os.rename(staged, final)
            fsync_path(root)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        log.info(
            "downloaded checkpoint %s (%d bytes) from %s", marker.tag, marker.total_bytes, self.url
        )
        return final

    def prune(self, keep: set[str]) -> None:
        """Delete every mirrored checkpoint folder whose tag is not in `keep`, marker first."""
        for tag in self.tags():
            if tag in keep:
                continue
            marker_path = self._remote(tag, MARKER_NAME)
            try:
                self.retry.call(
                    functools.partial(self.fs.rm_file, marker_path), f"delete of {marker_path}"
                )
            except FileNotFoundError:
                pass
            folder = self._remote(tag)
            try:
                self.retry.call(
                    functools.partial(self.fs.rm, folder, recursive=True), f"delete of {folder}"
                )
            except FileNotFoundError:
                pass
            log.info("deleted mirrored checkpoint %s/%s", self.url, tag)
        self.fs.invalidate_cache()
