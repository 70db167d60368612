"""Prometheus file-based service discovery targets: one JSON file per training rank."""

from __future__ import annotations

import json
import logging
import os
import re

log = logging.getLogger(__name__)

_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9_.-]")


def target_file_name(run: str, job_id: str, rank: int) -> str:
    """Return `<run>-<job_id>-rank<r>.json` with characters unsafe in file names replaced by `_`."""
    return _UNSAFE_FILE_CHARS.sub("_", f"{run}-{job_id}-rank{rank}") + ".json"


def format_address(host: str, port: int) -> str:
    """Return `host:port`, with brackets around an IPv6 host."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def write_target(sd_dir: str, name: str, address: str, labels: dict[str, str]) -> str:
    """Write `[{"targets": [address], "labels": labels}]` to `<sd_dir>/<name>` atomically.

    Returns the path. The directory is created when missing.
    """
    os.makedirs(sd_dir, exist_ok=True)
    path = os.path.join(sd_dir, name)
    # Prometheus reads only files matching its *.json glob, so the temporary file stays unread.
    tmp_path = f"{path}.tmp{os.getpid()}"
    with open(tmp_path, "w", encoding="utf-8") as f:
        json.dump([{"targets": [address], "labels": labels}], f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, path)
    log.info("wrote file-SD target %s -> %s", path, address)
    return path


def remove_target(path: str) -> None:
    """Delete a target file; a file already gone is fine, other failures are logged."""
    try:
        os.remove(path)
        log.info("removed file-SD target %s", path)
    except FileNotFoundError:
        pass
    except OSError as err:
        log.warning("could not remove file-SD target %s: %s", path, err)
