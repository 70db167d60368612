"""Rank-aware logging: every record carries the rank, and non-zero ranks log warnings only."""

from __future__ import annotations

import logging
import os


class _RankFilter(logging.Filter):
    def __init__(self, rank: int, all_ranks_level: int):
        super().__init__()
        self.rank = rank
        self.all_ranks_level = all_ranks_level

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return self.rank == 0 or record.levelno >= self.all_ranks_level


def current_rank() -> int:
    """Return the global rank from the launcher's environment (torchrun or Slurm), 0 if neither."""
    for name in ("RANK", "SLURM_PROCID"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def setup_logging(level: str | int = "INFO", rank: int | None = None) -> None:
    """Configure the root logger once: a `[rank N]` prefix, and INFO from rank 0 only.

    Non-zero ranks still log WARNING and above, because a failure on one rank must reach the job log.
    Set DDN_LOG_ALL_RANKS=1 to see INFO from every rank.
    """
    rank = current_rank() if rank is None else rank
    all_ranks_level = logging.DEBUG if os.environ.get("DDN_LOG_ALL_RANKS") == "1" else logging.WARNING
    handler = logging.StreamHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    handler.addFilter(_RankFilter(rank, all_ranks_level))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
