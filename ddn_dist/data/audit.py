"""Audit log of consumed samples: one JSON line per sample the training loop consumed.

Each rank appends to `<audit_dir>/rank<r>.jsonl` lines {"rank", "step", "epoch", "key"} and flushes
after every batch, so a killed run leaves whole lines except possibly a partial last one, which
`read_audit` ignores.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditRecord:
    """One consumed sample."""

    rank: int
    step: int
    epoch: int
    key: str


class AuditLog:
    """Appends the consumed samples of one rank to its JSONL file."""

    def __init__(self, audit_dir: str, rank: int):
        os.makedirs(audit_dir, exist_ok=True)
        self.path = os.path.join(audit_dir, f"rank{rank}.jsonl")
        self.rank = rank
        self._file = open(self.path, "a", encoding="utf-8")
        # A previous run killed mid-line leaves a partial last line; start ours on a fresh line.
        if self._file.tell() > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self._file.write("\n")

    def write(self, step: int, epoch: int, keys: list[str]) -> None:
        """Append one line per key and flush them to the operating system."""
        lines = "".join(
            json.dumps({"rank": self.rank, "step": step, "epoch": epoch, "key": key}) + "\n"
            for key in keys
        )
        self._file.write(lines)
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def read_audit(audit_dir: str) -> list[AuditRecord]:
    """Read every rank's audit file; lines that are not whole records are skipped and logged."""
    records = []
    for name in sorted(os.listdir(audit_dir)):
        if not (name.startswith("rank") and name.endswith(".jsonl")):
            continue
        path = os.path.join(audit_dir, name)
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                try:
                    raw = json.loads(line)
                    records.append(
                        AuditRecord(
                            int(raw["rank"]), int(raw["step"]), int(raw["epoch"]), str(raw["key"])
                        )
                    )
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    log.warning("skipping incomplete audit line %d of %s", number, path)
    return records
