"""Checkpoint client state: what the trainer stores beside DeepSpeed's own files, and restores."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

CLIENT_STATE_VERSION = 1


@dataclass
class Progress:
    """Counters of the run that a resume continues."""

    step: int = 0
    nimg: int = 0
    sp_events_total: int = 0
    nonfinite_total: int = 0

    @property
    def kimg(self) -> float:
        return self.nimg / 1000.0


def gather_rng_states() -> list[torch.Tensor]:
    """Return every rank's torch CPU RNG state, in rank order (collective)."""
    state = torch.get_rng_state()
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state)
    return gathered


def seed_rank_rng(seed: int, step: int, rank: int) -> None:
    """Give each rank its own chain-dropout random stream, derived from (seed, step, rank)."""
    torch.manual_seed((seed * 1_000_003 + step * 7_919 + rank + 1) % (2**63 - 1))


def build_client_state(progress: Progress, *, loader_state: dict, sp_state: dict,
                       ema_state: dict | None, rng_states: list[torch.Tensor], config_hash: str,
                       config: dict, world_size: int) -> dict:
    """Assemble the client state saved in every checkpoint (identical on every rank)."""
    return {
        "version": CLIENT_STATE_VERSION,
        "progress": asdict(progress),
        "loader": loader_state,
        "split_prune": sp_state,
        "ema": ema_state,
        "rng": rng_states,
        "config_hash": config_hash,
        "config": config,
        "world_size": world_size,
    }


def restore_client_state(state: dict, *, loader, split_prune, ema, config_hash: str, seed: int,
                         rank: int, world_size: int) -> Progress:
    """Restore loader, S&P statistics, EMA and RNG from a client state; return the progress."""
    if state.get("version") != CLIENT_STATE_VERSION:
        raise RuntimeError(f"checkpoint client state has version {state.get('version')!r}; this "
                           f"trainer reads version {CLIENT_STATE_VERSION}")
    if state["config_hash"] != config_hash:
        log.warning("the checkpoint was trained with config hash %s, this run has %s: the run "
                    "continues with the new settings", state["config_hash"], config_hash)
    progress = Progress(**state["progress"])
    loader.load_state_dict(state["loader"])
    split_prune.load_state_dict(state["split_prune"])
    if ema is not None:
        if state.get("ema") is not None:
            ema.load_full_state_dict(state["ema"])
        else:
            log.warning("the checkpoint has no EMA; the EMA starts from the current weights")
    rng = state.get("rng") or []
    if len(rng) == world_size:
        torch.set_rng_state(rng[rank])
    else:
        # Another world size: the random streams cannot continue, so derive fresh ones.
        seed_rank_rng(seed, progress.step, rank)
    return progress
