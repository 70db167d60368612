"""Prometheus metrics of one training process, and the file-SD target that it writes.

Every rank serves `/metrics` on `port_base + local_rank` from its own `CollectorRegistry`. The
series carry no rank or run labels themselves. Prometheus adds `job_id`, `run`, `rank` and `node`
from the file-SD target that each rank writes to `<sd_dir>/<run>-<job_id>-rank<r>.json`, so one
Prometheus watching that directory finds every job. The caller measures data-wait time in the main
process, because loader workers are forked and cannot update this registry.

Usage::

    m = TrainMetrics(MetricsConfig(sd_dir="/shared/prom-sd"), run="ffhq64", job_id="123", rank=0,
                     local_rank=0, node="gpu01", world_size=64, config_hash="9f2c...")
    m.start()
    m.observe_step(images=256, kimg=1.024, step_seconds=0.41, data_wait_seconds=0.02, loss=0.31,
                   group_losses={"8x8": 0.2}, grad_norm=1.3, lr=2e-4)
    m.close()
"""

from __future__ import annotations

import atexit
import errno
import hashlib
import json
import logging
import math
import platform
import resource
import sys
import time
from dataclasses import dataclass
from importlib import metadata

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from ddn_dist import file_sd

log = logging.getLogger(__name__)

STEP_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
CHECKPOINT_SECONDS_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

# Loader counters() key -> exported counter name and help text.
STORAGE_COUNTERS = {
    "bytes_read": ("ddn_storage_read_bytes_total", "Bytes read from shard storage by this rank."),
    "retries": ("ddn_storage_retries_total", "Storage reads retried after a transient error."),
    "errors": ("ddn_storage_errors_total", "Storage reads that failed after every retry."),
    "corrupt_skipped": ("ddn_corrupt_samples_skipped_total", "Corrupt samples skipped."),
    "padded": ("ddn_padded_samples_total", "Padding samples added to fill the last batch."),
    "dropped": ("ddn_dropped_samples_total", "Samples dropped to keep full batches."),
    "samples_consumed": ("ddn_samples_consumed_total", "Samples marked consumed by the loader."),
}


@dataclass
class MetricsConfig:
    """The `metrics:` section of a training config."""

    enabled: bool = True
    """Serve /metrics and write the file-SD target; when false every method is a no-op."""
    port_base: int = 9400
    """Rank with local rank r serves on port_base + r; 0 lets every rank take a free port."""
    bind_address: str = "0.0.0.0"
    """Address the HTTP server binds to."""
    sd_dir: str | None = None
    """Directory for Prometheus file-SD targets (JSON); None writes no target."""
    target_host: str | None = None
    """Host written into the file-SD target; None uses bind_address, or the node name if that is
    a wildcard address."""

    def __post_init__(self) -> None:
        if not isinstance(self.port_base, int) or not 0 <= self.port_base <= 65535:
            raise ValueError(
                f"metrics.port_base must be an integer port in 0..65535, got {self.port_base!r}"
            )

    @classmethod
    def from_dict(cls, values: dict | None) -> MetricsConfig:
        """Build from a config mapping, rejecting unknown keys by name."""
        values = dict(values or {})
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown metrics option(s) {unknown}; valid options are {sorted(known)}"
            )
        return cls(**values)


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "none"


def _gpu_available() -> bool:
    # Only consult torch when the caller already imported it; importing it here costs seconds.
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available())


class TrainMetrics:
    """The Prometheus metrics of one training rank, its HTTP endpoint and its file-SD target.

    `gpu` selects whether GPU memory gauges exist; None enables them when CUDA is available.
    `total_kimg` is the length of the run in thousands of images, exported for ETA (0 when unknown).
    """

    def __init__(
        self,
        config: MetricsConfig,
        *,
        run: str,
        job_id: str,
        rank: int,
        local_rank: int,
        node: str,
        world_size: int,
        config_hash: str,
        total_kimg: float = 0.0,
        gpu: bool | None = None,
    ):
        self.config = config
        self.run = str(run)
        self.job_id = str(job_id)
        self.rank = int(rank)
        self.local_rank = int(local_rank)
        self.node = str(node)
        self.world_size = int(world_size)
        self.enabled = bool(config.enabled)
        self.registry = CollectorRegistry()
        self.port: int | None = None
        self.sd_path: str | None = None
        self._server = None
        self._thread = None
        self._storage_seen: dict[str, int] = {}
        self._groups_seen: set[str] = set()
        self._process = psutil.Process()
        self._gpu = _gpu_available() if gpu is None else bool(gpu)
        self._define_metrics()

        # The file-SD target also labels every series with run and job_id. Prometheus therefore
        # stores these two as exported_run and exported_job_id, with the same values.
        self.info.info(
            {
                "run": self.run,
                "job_id": self.job_id,
                "config_hash": str(config_hash),
                "world_size": str(self.world_size),
                "ddn_dist_version": _package_version("ddn-dist"),
                "torch_version": _package_version("torch"),
                "deepspeed_version": _package_version("deepspeed"),
                "python_version": platform.python_version(),
            }
        )
        self.total_kimg.set(float(total_kimg))

    def _define_metrics(self) -> None:
        self._define_step_metrics(self.registry)
        self._define_health_metrics(self.registry)
        self._define_resource_metrics(self.registry)

    def _define_step_metrics(self, r: CollectorRegistry) -> None:
        self.info = Info("ddn_run", "Run metadata: config hash, versions, world size.", registry=r)
        self.start_time = Gauge(
            "ddn_start_time_seconds",
            "Unix time at which this rank started its metrics.",
            registry=r,
        )
        self.steps = Counter(
            "ddn_steps_total", "Optimizer steps completed by this rank.", registry=r
        )
        self.images = Counter(
            "ddn_images_processed_total", "Training images processed by this rank.", registry=r
        )
        self.kimg = Gauge(
            "ddn_progress_kimg",
            "Training progress of the whole run in thousands of images.",
            registry=r,
        )
        self.total_kimg = Gauge(
            "ddn_total_kimg",
            "Length of the run in thousands of images (0 when unknown).",
            registry=r,
        )
        self.step_seconds = Histogram(
            "ddn_step_duration_seconds",
            "Wall time of one training step, data wait included.",
            buckets=STEP_SECONDS_BUCKETS,
            registry=r,
        )
        self.data_wait = Counter(
            "ddn_data_wait_seconds_total",
            "Time the main process waited for the next batch.",
            registry=r,
        )
        self.data_wait_ratio = Gauge(
            "ddn_data_wait_ratio",
            "Share of the last step spent waiting for data (0..1).",
            registry=r,
        )
        self.last_step = Gauge(
            "ddn_last_step_timestamp_seconds",
            "Unix time of the last completed step (the metrics start time before the first step).",
            registry=r,
        )
        self.loss = Gauge("ddn_loss", "Training loss of the last step on this rank.", registry=r)
        self.group_loss = Gauge(
            "ddn_layer_group_loss",
            "Training loss of the last step, mean over the layers of one group.",
            ["group"],
            registry=r,
        )
        self.grad_norm = Gauge(
            "ddn_grad_norm", "Global gradient L2 norm of the last step.", registry=r
        )
        self.lr = Gauge("ddn_learning_rate", "Learning rate of the last step.", registry=r)

    def _define_health_metrics(self, r: CollectorRegistry) -> None:
        self.nonfinite = Counter(
            "ddn_nonfinite_steps_skipped_total",
            "Steps skipped because the loss or gradients were not finite.",
            registry=r,
        )
        self.restarts = Counter(
            "ddn_restarts_total",
            "Times this process resumed the run from a checkpoint.",
            registry=r,
        )
        self.sp_events = Counter(
            "ddn_split_prune_events_total",
            "Split-and-prune events applied, per layer group.",
            ["group"],
            registry=r,
        )
        self.freq_spread = Gauge(
            "ddn_node_frequency_spread",
            "Standard deviation of the node selection frequencies p_k*K over a layer group "
            "(0 when uniform).",
            ["group"],
            registry=r,
        )
        self.checkpoint_seconds = Histogram(
            "ddn_checkpoint_save_duration_seconds",
            "Wall time of one successful checkpoint save.",
            buckets=CHECKPOINT_SECONDS_BUCKETS,
            registry=r,
        )
        self.last_checkpoint = Gauge(
            "ddn_checkpoint_last_success_timestamp_seconds",
            "Unix time of the last successful checkpoint save (0 before the first).",
            registry=r,
        )

    def _define_resource_metrics(self, r: CollectorRegistry) -> None:
        self.rss = Gauge(
            "ddn_process_resident_memory_bytes", "Resident set size of this process.", registry=r
        )
        self.rss_max = Gauge(
            "ddn_process_resident_memory_max_bytes",
            "Peak resident set size of this process.",
            registry=r,
        )
        if self._gpu:
            self.gpu_allocated = Gauge(
                "ddn_gpu_memory_allocated_bytes", "GPU memory allocated by tensors.", registry=r
            )
            self.gpu_max_allocated = Gauge(
                "ddn_gpu_memory_max_allocated_bytes",
                "Peak GPU memory allocated by tensors.",
                registry=r,
            )
            self.gpu_reserved = Gauge(
                "ddn_gpu_memory_reserved_bytes",
                "GPU memory reserved by the caching allocator.",
                registry=r,
            )
        self.storage = {
            key: Counter(name, help_text, registry=r)
            for key, (name, help_text) in STORAGE_COUNTERS.items()
        }

    # Lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Serve /metrics on port_base + local_rank and write the file-SD target when sd_dir is set.

        Raises RuntimeError naming the port and the option to change when the port is taken.
        """
        if not self.enabled or self._server is not None:
            return
        now = time.time()
        self.start_time.set(now)
        self.last_step.set(now)
        self.update_memory()

        port = 0 if self.config.port_base == 0 else self.config.port_base + self.local_rank
        if port > 65535:
            raise ValueError(
                f"metrics port {port} (metrics.port_base {self.config.port_base} + local rank "
                f"{self.local_rank}) is above 65535; lower metrics.port_base"
            )
        try:
            self._server, self._thread = start_http_server(
                port, addr=self.config.bind_address, registry=self.registry
            )
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise
            raise RuntimeError(
                f"metrics port {port} on {self.config.bind_address} is already in use "
                f"(metrics.port_base {self.config.port_base} + local rank {self.local_rank}); "
                "set metrics.port_base to a free range, 0 for any free port, or "
                "metrics.enabled: false"
            ) from err
        self.port = int(self._server.server_port)
        log.info(
            "serving metrics on %s:%d for run %s job %s rank %d",
            self.config.bind_address, self.port, self.run, self.job_id, self.rank,
        )
        atexit.register(self.close)
        if self.config.sd_dir:
            self._write_sd_target()

    def close(self) -> None:
        """Remove the file-SD target and stop the HTTP server; safe to call more than once."""
        if self.sd_path is not None:
            file_sd.remove_target(self.sd_path)
            self.sd_path = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            self._thread = None
            atexit.unregister(self.close)

    def __enter__(self) -> TrainMetrics:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def target_host(self) -> str:
        """Return the host name written into the file-SD target."""
        if self.config.target_host:
            return self.config.target_host
        if self.config.bind_address not in ("", "0.0.0.0", "::"):
            return self.config.bind_address
        return self.node

    def _write_sd_target(self) -> None:
        labels = {"job_id": self.job_id, "run": self.run, "rank": str(self.rank), "node": self.node}
        self.sd_path = file_sd.write_target(
            str(self.config.sd_dir),
            file_sd.target_file_name(self.run, self.job_id, self.rank),
            file_sd.format_address(self.target_host(), self.port),
            labels,
        )

    # Observations ---------------------------------------------------------------------------------

    def observe_step(
        self,
        *,
        images: int,
        kimg: float,
        step_seconds: float,
        data_wait_seconds: float,
        loss: float,
        group_losses: dict[str, float],
        grad_norm: float,
        lr: float,
    ) -> None:
        """Record one completed step of this rank.

        Args:
            images: images this rank processed in the step.
            kimg: progress of the whole run in thousands of images.
            step_seconds: wall time of the step, data_wait_seconds included.
            data_wait_seconds: time the main process waited for the batch.
        """
        if not self.enabled:
            return
        if images < 0 or step_seconds < 0 or data_wait_seconds < 0:
            raise ValueError(
                f"observe_step needs non-negative images, step_seconds and data_wait_seconds, got "
                f"{images}, {step_seconds}, {data_wait_seconds}"
            )
        self.steps.inc()
        self.images.inc(images)
        self.kimg.set(kimg)
        self.step_seconds.observe(step_seconds)
        self.data_wait.inc(data_wait_seconds)
        share = data_wait_seconds / step_seconds if step_seconds > 0 else 0.0
        self.data_wait_ratio.set(min(share, 1.0))
        self.loss.set(loss)
        for group, value in group_losses.items():
            self.group_loss.labels(group).set(value)
            if group not in self._groups_seen:
                # Export zero S&P events for every group from the start, so rates have a baseline.
                self._groups_seen.add(group)
                self.sp_events.labels(group)
        self.grad_norm.set(grad_norm)
        self.lr.set(lr)
        self.last_step.set(time.time())

    def skipped_nonfinite(self) -> None:
        """Count a step skipped because its loss or gradients were not finite."""
        if self.enabled:
            self.nonfinite.inc()

    def restarted(self) -> None:
        """Count a resume of the run from a checkpoint by this process."""
        if self.enabled:
            self.restarts.inc()

    def split_prune(self, group: str, events: int) -> None:
        """Count `events` split-and-prune events applied to the layers of `group`."""
        if self.enabled:
            self._groups_seen.add(group)
            self.sp_events.labels(group).inc(events)

    def node_frequency_spread(self, group: str, value: float) -> None:
        """Set the spread of the node selection frequencies of `group`; see `frequency_spread`."""
        if self.enabled:
            self.freq_spread.labels(group).set(value)

    def checkpoint_saved(self, seconds: float) -> None:
        """Record a successful checkpoint save that took `seconds`."""
        if self.enabled:
            self.checkpoint_seconds.observe(seconds)
            self.last_checkpoint.set(time.time())

    def update_storage(self, counters: dict) -> None:
        """Export the loader's cumulative counters() as Prometheus counters.

        Counters only increase, so a value below the previous one (a loader rebuilt from scratch)
        is counted as a fresh start from zero. Unknown keys are ignored.
        """
        if not self.enabled:
            return
        for key, counter in self.storage.items():
            if key not in counters:
                continue
            value = int(counters[key])
            previous = self._storage_seen.get(key, 0)
            increase = value - previous if value >= previous else value
            if increase > 0:
                counter.inc(increase)
            self._storage_seen[key] = value

    def update_memory(self) -> None:
        """Set the process RSS gauges and, when CUDA is in use, the GPU memory gauges."""
        if not self.enabled:
            return
        self.rss.set(self._process.memory_info().rss)
        # ru_maxrss is in KiB on Linux.
        self.rss_max.set(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        if self._gpu and _gpu_available():
            import torch

            device = torch.cuda.current_device()
            self.gpu_allocated.set(torch.cuda.memory_allocated(device))
            self.gpu_max_allocated.set(torch.cuda.max_memory_allocated(device))
            self.gpu_reserved.set(torch.cuda.memory_reserved(device))


def frequency_spread(frequencies: list[float] | tuple[float, ...]) -> float:
    """Return the standard deviation of p_k*K over the K nodes of a layer (0 when uniform).

    `frequencies` are selection counts or probabilities p_k; p_k*K has mean 1, so the result is
    also its coefficient of variation. All-zero input counts as uniform.
    """
    total = float(sum(frequencies))
    k = len(frequencies)
    if k == 0 or total <= 0:
        return 0.0
    scaled = [f / total * k for f in frequencies]
    return math.sqrt(sum((x - 1.0) ** 2 for x in scaled) / k)


def config_hash(config: dict) -> str:
    """Return a short stable hash of a config mapping, for the ddn_run_info metric."""
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
