"""Per-tick training statistics: one status line in the log and one JSON line in stats.jsonl."""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from dataclasses import dataclass, field

import psutil
import torch

log = logging.getLogger("ddn_dist.train")


@dataclass
class TickAccumulator:
    """Sums over the steps of the current tick; losses are averaged over all ranks."""

    steps: int = 0
    images: int = 0
    loss_sum: float = 0.0
    group_loss_sums: dict[str, float] = field(default_factory=dict)
    sp_events: int = 0
    nonfinite_steps: int = 0
    data_wait_seconds: float = 0.0
    started: float = field(default_factory=time.monotonic)

    def add_step(self, images: int, loss: float, group_losses: dict[str, float], sp_events: int,
                 data_wait_seconds: float, finite: bool) -> None:
        """Add one optimizer step; a skipped (non-finite) step adds images but no loss."""
        self.images += images
        self.sp_events += sp_events
        self.data_wait_seconds += data_wait_seconds
        if not finite:
            self.nonfinite_steps += 1
            return
        self.steps += 1
        self.loss_sum += loss
        for group, value in group_losses.items():
            self.group_loss_sums[group] = self.group_loss_sums.get(group, 0.0) + value


def memory_fields() -> dict[str, float]:
    """Return RSS (current and peak) in MB and, on GPUs, allocated memory in MB."""
    fields = {
        "rss_mb": psutil.Process().memory_info().rss / 2**20,
        # ru_maxrss is in KiB on Linux.
        "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if torch.cuda.is_available():
        fields["gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return fields


class StatsWriter:
    """Formats tick records, logs them and appends them to `<run_dir>/stats.jsonl` (rank 0 only)."""

    def __init__(self, run_dir: str, enabled: bool):
        self.path = os.path.join(run_dir, "stats.jsonl")
        self.enabled = enabled

    def record(self, tick: TickAccumulator, *, kimg: float, step: int, lr: float,
               total_sp_events: int, total_nonfinite: int) -> dict:
        """Build the record of a finished tick, log the status line and append it to stats.jsonl."""
        seconds = max(time.monotonic() - tick.started, 1e-9)
        steps = max(tick.steps, 1)
        record = {
            "time": time.time(),
            "kimg": round(kimg, 3),
            "step": step,
            "images_per_second": tick.images / seconds,
            "seconds_per_kimg": seconds / max(tick.images / 1000.0, 1e-9),
            "loss": tick.loss_sum / steps if tick.steps else float("nan"),
            "group_losses": {g: v / steps for g, v in tick.group_loss_sums.items()},
            "lr": lr,
            "sp_events": tick.sp_events,
            "sp_events_total": total_sp_events,
            "nonfinite_steps": tick.nonfinite_steps,
            "nonfinite_steps_total": total_nonfinite,
            "data_wait_fraction": min(1.0, tick.data_wait_seconds / seconds),
            **memory_fields(),
        }
        if not self.enabled:
            return record
        groups = " ".join(f"{g}={v:.4f}" for g, v in record["group_losses"].items())
        memory = f"rss {record['rss_mb']:.0f} MB"
        if "gpu_mb" in record:
            memory += f" gpu {record['gpu_mb']:.0f} MB"
        log.info(
            "kimg %.2f step %d | %.1f img/s %.2f s/kimg | loss %.5f [%s] | lr %.2e | S&P %d "
            "| skipped %d | data wait %.0f%% | %s",
            kimg, step, record["images_per_second"], record["seconds_per_kimg"], record["loss"],
            groups, lr, tick.sp_events, tick.nonfinite_steps,
            100 * record["data_wait_fraction"], memory,
        )
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        return record
