"""Connects the trainer to the Prometheus exporter in `ddn_dist.metrics`."""

from __future__ import annotations

import logging
import os

from ddn_dist.config import TrainConfig
from ddn_dist.metrics import MetricsConfig, TrainMetrics, frequency_spread

log = logging.getLogger(__name__)


class TrainerMetrics(TrainMetrics):
    """TrainMetrics plus the per-group node-frequency spread computed from S&P statistics."""

    def update_frequencies(self, split_prune, layer_groups: list[str]) -> None:
        """Export, per layer group, the largest frequency spread among its layers."""
        if not self.enabled:
            return
        spreads: dict[str, float] = {}
        for layer, group in enumerate(layer_groups[: len(split_prune.ddls)]):
            value = frequency_spread(split_prune.frequencies(layer).tolist())
            spreads[group] = max(spreads.get(group, 0.0), value)
        for group, value in spreads.items():
            self.node_frequency_spread(group, value)


def build_metrics(cfg: TrainConfig, info, config_hash: str) -> TrainerMetrics:
    """Create and start this rank's metrics endpoint (a no-op object when metrics are disabled)."""
    section = cfg.metrics
    mcfg = MetricsConfig(enabled=section.enabled, port_base=section.port_base,
                         bind_address=section.bind_address, sd_dir=section.sd_dir,
                         target_host=section.target_host)
    job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID") or "local"
    metrics = TrainerMetrics(mcfg, run=os.path.basename(os.path.abspath(cfg.train.run_dir)),
                             job_id=job_id, rank=info.rank, local_rank=info.local_rank,
                             node=info.node, world_size=info.world_size, config_hash=config_hash,
                             total_kimg=cfg.train.duration_kimg)
    metrics.start()
    if metrics.enabled:
        log.info("metrics of rank %d served on port %s", info.rank, metrics.port)
    return metrics
