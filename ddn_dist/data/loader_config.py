"""Options of the streaming loader (`ddn_dist.data.loader.StreamingLoader`)."""

from __future__ import annotations

from dataclasses import dataclass

from ddn_dist.data.plan import REMAINDER_RULES

ON_CORRUPT_RULES = ("skip", "raise")


@dataclass
class LoaderConfig:
    """Options of the streaming loader."""

    data: str
    """Data set location: a local directory, `s3://bucket/prefix`, or the index.json URL itself."""
    endpoint_url: str | None = None
    """S3 endpoint of an S3-compatible store; default AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL."""
    batch_size: int = 32
    """Per-rank micro-batch size in images."""
    num_workers: int = 2
    """DataLoader worker processes per rank; 0 reads in the training process."""
    seed: int = 0
    """Seed of the epoch plans; the same seed gives the same sample order on any world size."""
    remainder: str = "drop"
    """"drop": samples left over after equal full batches wait for the next epoch; "pad": the last
    batches are filled with duplicates marked valid=False."""
    on_corrupt: str = "skip"
    """"skip": count a truncated or undecodable sample and mark its slot invalid; "raise": stop."""
    audit_dir: str | None = None
    """Directory for rank<r>.jsonl records of every consumed sample; None disables the audit."""
    pin_memory: bool = False
    """Pin batch memory (only when CUDA is available)."""
    # NOTE: the pinned-memory path goes through Batch.pin_memory; it has not run on a GPU machine.
    persistent_workers: bool = False
    """Keep worker processes between epochs."""
    max_run_length: int = 64
    """Maximum samples per ranged read."""
    open_runs: int = 16
    """Runs a worker interleaves at once; more gives a better shuffle and uses more memory."""
    prefetch_runs: int = 4
    """Runs a worker fetches ahead, beyond the open_runs that the merge reads from."""
    prefetch_batches: int = 2
    """Batches each worker prepares ahead (DataLoader prefetch_factor)."""
    connect_timeout_seconds: float = 10.0
    """Seconds to wait for an S3 connection before the attempt counts as failed."""
    read_timeout_seconds: float = 30.0
    """Seconds without data from S3 before a read counts as stalled and is retried."""
    retry_attempts: int = 8
    """Attempts per ranged read before a transient storage error stops the run."""
    retry_base_delay_seconds: float = 0.05
    """Backoff base: attempt n waits a random time up to base x 2**n seconds."""
    retry_max_delay_seconds: float = 5.0
    """Upper bound of one backoff wait in seconds."""
    check_shards: bool = True
    """List the store at start-up and raise when a shard of the index is missing."""
    multiprocessing_context: str | None = None
    """Worker start method ("fork", "spawn", "forkserver"); None for torch's default."""

    def validate(self) -> None:
        """Raise ValueError naming the first invalid option and its valid values."""
        if self.remainder not in REMAINDER_RULES:
            raise ValueError(
                f"remainder={self.remainder!r} is invalid; use one of {REMAINDER_RULES}"
            )
        if self.on_corrupt not in ON_CORRUPT_RULES:
            raise ValueError(
                f"on_corrupt={self.on_corrupt!r} is invalid; use one of {ON_CORRUPT_RULES}"
            )
        for name in (
            "batch_size",
            "max_run_length",
            "open_runs",
            "prefetch_runs",
            "prefetch_batches",
            "retry_attempts",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)} is invalid; it must be at least 1")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers} is invalid; use 0 or more")
        if self.persistent_workers and self.num_workers == 0:
            raise ValueError("persistent_workers=True needs num_workers >= 1")
