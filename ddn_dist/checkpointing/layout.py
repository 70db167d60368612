"""On-disk layout of a checkpoint directory and its completion marker.

A checkpoint directory `<root>/<tag>/` contains DeepSpeed's files. It counts as complete only when
`<root>/<tag>/COMPLETE.json` exists and every file it lists has the listed size. Rank 0 writes that
marker after every rank has written and flushed its files, and then atomically replaces the
pointer `<root>/latest_complete`. A universal conversion of `<tag>` lives in
`<root>/<tag>_universal/` with a marker of its own.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field

from ddn_dist import storage

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MARKER_NAME = "COMPLETE.json"
POINTER_NAME = "latest_complete"
UNIVERSAL_SUFFIX = "_universal"
# Names DeepSpeed itself writes into the checkpoint root (its own pointers, never used here).
DEEPSPEED_POINTERS = ("latest", "latest_universal")
_TAG_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class CompleteMarker:
    """Contents of COMPLETE.json: what was saved, by how many ranks, and every file's size."""

    tag: str
    sequence: int  # 1 + the highest sequence in the root when saved; orders checkpoints
    world_size: int  # data-parallel ranks that saved it
    zero_stage: int
    partitioned_optimizer: bool  # True when optimizer states are split into per-rank files
    files: dict[str, int] = field(default_factory=dict)  # path relative to the tag dir -> bytes
    saved_at_unix: float = 0.0
    kind: str = "native"  # "native" (written by save_checkpoint) or "universal" (converted)
    format_version: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        """Sum of the sizes of all listed files, in bytes."""
        return sum(self.files.values())


def validate_tag(tag: str) -> str:
    """Return `tag` when it can name a checkpoint directory, else raise ValueError."""
    if not isinstance(tag, str) or not _TAG_PATTERN.match(tag):
        raise ValueError(
            f"invalid checkpoint tag {tag!r}: use letters, digits, '_', '-' or '.', "
            "starting with a letter or digit, e.g. 'kimg000120'"
        )
    if tag.endswith(UNIVERSAL_SUFFIX) or tag in DEEPSPEED_POINTERS or tag == POINTER_NAME:
        raise ValueError(
            f"invalid checkpoint tag {tag!r}: names ending in '{UNIVERSAL_SUFFIX}' and the names "
            f"{DEEPSPEED_POINTERS + (POINTER_NAME,)} are reserved; choose another tag"
        )
    return tag


def list_files(directory: str) -> dict[str, int]:
    """Return every regular file under `directory` (relative path -> size in bytes), no marker."""
    sizes: dict[str, int] = {}
    for parent, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(parent, name)
            relative = os.path.relpath(path, directory)
            if relative != MARKER_NAME:
                sizes[relative] = os.path.getsize(path)
    return dict(sorted(sizes.items()))


def fsync_path(path: str) -> None:
    """Flush a file or directory to stable storage."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str, text: str) -> None:
    """Write `text` to `path` through a flushed temporary file and a rename, then fsync the folder."""
    storage.write_bytes_atomic(path, text.encode("utf-8"))
    fsync_path(os.path.dirname(path))


def write_marker(directory: str, marker: CompleteMarker) -> None:
    """Write COMPLETE.json into `directory` atomically; call only after its files are flushed."""
    write_text_atomic(os.path.join(directory, MARKER_NAME), json.dumps(asdict(marker), indent=1))


def parse_marker(text: str, source: str) -> CompleteMarker | None:
    """Parse marker JSON; return None (and log why) when it is malformed or of another version."""
    try:
        data = json.loads(text)
        marker = CompleteMarker(**data)
    except (ValueError, TypeError) as error:
        log.warning(
            "ignoring checkpoint marker %s: it is not valid JSON of a marker (%s)", source, error
        )
        return None
    if marker.format_version != FORMAT_VERSION:
        log.warning(
            "ignoring checkpoint marker %s: format version %s, expected %s",
            source,
            marker.format_version,
            FORMAT_VERSION,
        )
        return None
    return marker


def read_marker(directory: str) -> CompleteMarker | None:
    """Return the marker of `directory`, or None when it is missing or malformed."""
    path = os.path.join(directory, MARKER_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    return parse_marker(text, path)


def verify_files(directory: str, marker: CompleteMarker) -> list[str]:
    """Return one message per listed file that is missing or has another size (empty when valid)."""
    problems = []
    for relative, expected in marker.files.items():
        path = os.path.join(directory, relative)
        try:
            actual = os.path.getsize(path)
        except OSError:
            problems.append(f"{path} is missing")
            continue
        if actual != expected:
            problems.append(f"{path} has {actual} bytes, the marker lists {expected}")
    return problems


def read_pointer(root: str) -> str | None:
    """Return the tag named by `<root>/latest_complete`, or None when there is none."""
    try:
        with open(os.path.join(root, POINTER_NAME), encoding="utf-8") as f:
            tag = f.read().strip()
    except FileNotFoundError:
        return None
    return tag or None


def write_pointer(root: str, tag: str) -> None:
    """Point `<root>/latest_complete` at `tag` atomically."""
    write_text_atomic(os.path.join(root, POINTER_NAME), tag + "\n")


def checkpoint_dirs(root: str) -> list[str]:
    """Return the names of the native checkpoint directories under `root`, complete or not."""
    if not os.path.isdir(root):
        return []
    names = []
    for name in os.listdir(root):
        if name.startswith(".") or name.endswith(UNIVERSAL_SUFFIX):
            continue
        if os.path.isdir(os.path.join(root, name)):
            names.append(name)
    return sorted(names)


def valid_marker(root: str, tag: str) -> CompleteMarker | None:
    """Return the marker of `<root>/<tag>` when it is complete and every file checks out."""
    directory = os.path.join(root, tag)
    marker = read_marker(directory)
    if marker is None:
        return None
    problems = verify_files(directory, marker)
    if problems:
        log.warning(
            "checkpoint %s is damaged and is ignored: %s", directory, "; ".join(problems[:3])
        )
        return None
    return marker


def complete_checkpoints(root: str) -> list[CompleteMarker]:
    """Return the markers of all complete, verified checkpoints under `root`, oldest first."""
    markers = [m for m in (valid_marker(root, tag) for tag in checkpoint_dirs(root)) if m]
    return sorted(markers, key=lambda m: m.sequence)


def newest_complete(root: str) -> CompleteMarker | None:
    """Return the marker of the latest complete checkpoint under `root`, or None.

    The pointer decides. When it is missing or names a damaged checkpoint (for example after a crash
    between the marker and the pointer), the complete checkpoint with the highest sequence wins.
    """
    pointed = read_pointer(root)
    if pointed is not None:
        marker = valid_marker(root, pointed)
        if marker is not None:
            return marker
        log.warning(
            "%s names %r, which is not a complete checkpoint; using the newest complete one",
            os.path.join(root, POINTER_NAME),
            pointed,
        )
    markers = complete_checkpoints(root)
    return markers[-1] if markers else None


def remove_checkpoint_dir(path: str) -> None:
    """Delete a checkpoint directory, marker first, so that a partial one never looks complete."""
    marker = os.path.join(path, MARKER_NAME)
    if os.path.exists(marker):
        os.remove(marker)
    shutil.rmtree(path)


def remove_checkpoint(root: str, tag: str) -> None:
    """Delete `<root>/<tag>` and its universal conversion, and the pointer if it names `tag`."""
    for name in (tag, tag + UNIVERSAL_SUFFIX):
        path = os.path.join(root, name)
        if os.path.isdir(path):
            log.warning("replacing existing checkpoint directory %s", path)
            remove_checkpoint_dir(path)
    if read_pointer(root) == tag:
        os.remove(os.path.join(root, POINTER_NAME))


def read_markers(root: str) -> list[CompleteMarker]:
    """Return the markers found under `root`, unsorted, without checking file sizes."""
    markers = (read_marker(os.path.join(root, t)) for t in checkpoint_dirs(root))
    return [m for m in markers if m]
