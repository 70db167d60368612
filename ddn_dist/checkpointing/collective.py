"""Small collectives over torch.distributed that degrade to no-ops in a single process.

Checkpoint bookkeeping runs on rank 0 only. These helpers send its result, or its error, to every
rank, so that a failure on rank 0 raises on all ranks instead of leaving the others in a barrier.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


def is_distributed() -> bool:
    """Return True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Return the global rank, or 0 without a process group."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Return the world size of the default group, else WORLD_SIZE from the launcher, else 1."""
    if is_distributed():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def barrier() -> None:
    """Wait for every rank; a no-op without a process group."""
    if is_distributed():
        dist.barrier()


def broadcast_from_rank0(value: T) -> T:
    """Return rank 0's `value` on every rank (any picklable object)."""
    if not is_distributed():
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_true(flag: bool) -> bool:
    """Return True on every rank when `flag` is True on every rank."""
    if not is_distributed():
        return flag
    flags: list[bool] = [False] * dist.get_world_size()
    dist.all_gather_object(flags, bool(flag))
    return all(flags)


class RankZeroError(RuntimeError):
    """Raised on every rank when a step that only rank 0 performs failed there."""


def run_on_rank0(fn: Callable[[], T], description: str) -> T:
    """Run `fn` on rank 0 and return its result on every rank.

    When `fn` raises on rank 0, rank 0 re-raises the original error and every other rank raises
    RankZeroError naming `description`, so no rank is left waiting in a later collective.
    """
    result: T | None = None
    error: BaseException | None = None
    if rank() == 0:
        try:
            result = fn()
        except Exception as caught:  # noqa: BLE001 - sent to the other ranks, then re-raised
            error = caught
    message = broadcast_from_rank0(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise RankZeroError(f"{description} failed on rank 0: {message}")
    return broadcast_from_rank0(result)
