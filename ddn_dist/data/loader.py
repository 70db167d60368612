"""The streaming loader: exact, elastic and fault-tolerant reading of WebDataset shards.

Every sample is delivered at most once per epoch across all ranks, and exactly once unless
remainder="drop" leaves fewer than world_size x batch_size samples over. Every rank yields the
same number of batches, and the loader state (epoch plus the consumed positions of the epoch
plan) restores at any world size or worker count. See `ddn_dist.data.plan` for the epoch plan
and the remainder rule, `ddn_dist.data.stream` for what a loader worker does.

    config = LoaderConfig(data="s3://bucket/digits", batch_size=64)
    loader = StreamingLoader(config, rank, world_size)
    for batch in loader:            # the rest of the current epoch
        ...                         # train step on batch.images, masked by batch.valid
        loader.mark_consumed(batch, step)
    state = loader.state_dict()     # collective when torch.distributed is initialised
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ddn_dist.data.audit import AuditLog, read_audit
from ddn_dist.data.index import ShardIndex, index_url_for, load_index
from ddn_dist.data.loader_config import LoaderConfig
from ddn_dist.data.plan import EpochPlan, IntervalSet, count_batches, layout_pass
from ddn_dist.data.reader import (
    DataCorruptionError,
    MissingShardError,
    ReadCounters,
    ReaderOptions,
    ShardReader,
    check_shards_exist,
)
from ddn_dist.data.stream import Batch, PassDataset, PassSpec, write_spec

__all__ = [
    "Batch",
    "DataCorruptionError",
    "LoaderConfig",
    "MissingShardError",
    "StreamingLoader",
    "read_audit",
]

log = logging.getLogger(__name__)

STATE_FORMAT = "ddn-loader-state"
STATE_VERSION = 1


@dataclass
class _Pass:
    pass_id: int
    remaining: list[tuple[int, int]]
    num_batches: int
    next_batch: int = 0  # batches marked consumed so far

    @property
    def finished(self) -> bool:
        return self.next_batch >= self.num_batches


def index_fingerprint(index: ShardIndex) -> str:
    """Return a short hash of the shard list, so a state is never applied to another data set."""
    listing = [[s.url, s.num_samples, s.sha256] for s in index.shards]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


class StreamingLoader:
    """Iterates one rank's batches of the current epoch; see the module docstring."""

    def __init__(self, cfg: LoaderConfig, rank: int = 0, world_size: int = 1):
        cfg.validate()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is invalid for world_size={world_size}")
        if dist.is_available() and dist.is_initialized():
            if (dist.get_rank(), dist.get_world_size()) != (rank, world_size):
                raise ValueError(
                    f"rank={rank}, world_size={world_size} differ from torch.distributed "
                    f"({dist.get_rank()}, {dist.get_world_size()}); pass those"
                )
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.index_url = index_url_for(cfg.data)
        self.index = load_index(cfg.data, cfg.endpoint_url)
        if cfg.remainder == "drop" and self.index.num_samples < world_size * cfg.batch_size:
            raise ValueError(
                f"data set {self.index_url} has {self.index.num_samples} samples, fewer than "
                f"world_size x batch_size = {world_size * cfg.batch_size}, so remainder='drop' "
                f"gives no batch; use a smaller batch_size or remainder='pad'"
            )
        options = ReaderOptions(
            cfg.endpoint_url,
            cfg.connect_timeout_seconds,
            cfg.read_timeout_seconds,
            cfg.retry_attempts,
            cfg.retry_base_delay_seconds,
            cfg.retry_max_delay_seconds,
        )
        if cfg.check_shards:
            check_shards_exist(ShardReader(self.index, self.index_url, options))
        self._tmpdir = tempfile.mkdtemp(prefix="ddn-loader-")
        self._finalizer = weakref.finalize(self, shutil.rmtree, self._tmpdir, True)
        self._spec_path = os.path.join(self._tmpdir, "pass.pkl")
        self._dataset = PassDataset(
            self.index, self.index_url, options, cfg.on_corrupt, self._spec_path
        )
        self._dataloader: DataLoader | None = None
        self._audit = AuditLog(cfg.audit_dir, rank) if cfg.audit_dir else None
        self._fingerprint = index_fingerprint(self.index)

        self.epoch = 0
        self._base = IntervalSet()  # consumed in this epoch before this process took over
        self._local = IntervalSet()  # consumed by this rank since then
        self._pass: _Pass | None = None
        self._pass_counter = 0
        self._read = ReadCounters()
        self._padded = 0
        self._dropped = 0
        self._samples_consumed = 0

    # Iteration

    def __iter__(self):
        spec = self._start_pass()
        return self._iterate(spec)

    def _start_pass(self) -> PassSpec:
        if self._pass is not None and self._pass.finished:
            self._next_epoch()
        self._pass_counter += 1
        if self._pass is None:
            while True:
                remaining = self._base.complement(self.index.num_samples)
                num_batches = count_batches(
                    len(remaining), self.world_size, self.cfg.batch_size, self.cfg.remainder
                )
                if num_batches > 0:
                    break
                self._count_dropped(len(remaining))
                self._next_epoch()
            self._pass = _Pass(self._pass_counter, remaining.intervals(), num_batches)
            self._count_layout()
        else:
            self._pass.pass_id = self._pass_counter
        spec = PassSpec(
            self._pass.pass_id,
            self.cfg.seed,
            self.epoch,
            self._pass.remaining,
            self.world_size,
            self.rank,
            self.cfg.num_workers,
            self.cfg.batch_size,
            self.cfg.remainder,
            self.cfg.max_run_length,
            self.cfg.open_runs,
            self.cfg.prefetch_runs,
            first_batch=self._pass.next_batch,
        )
        log.debug(
            "rank %d starts pass %d of epoch %d at batch %d of %d",
            self.rank,
            spec.pass_id,
            self.epoch,
            spec.first_batch,
            self._pass.num_batches,
        )
        return spec

    def _next_epoch(self) -> None:
        self.epoch += 1
        self._base = IntervalSet()
        self._local = IntervalSet()
        self._pass = None

    def _count_layout(self) -> None:
        plan = EpochPlan(self.index, self.cfg.seed, self.epoch)
        layout = layout_pass(
            plan,
            IntervalSet(self._pass.remaining),
            self.world_size,
            self.cfg.num_workers,
            self.cfg.batch_size,
            self.cfg.remainder,
            self.cfg.max_run_length,
        )
        self._padded += layout.num_batches * self.cfg.batch_size - layout.real_counts[self.rank]
        self._count_dropped(layout.num_dropped)

    def _count_dropped(self, total: int) -> None:
        # Each rank counts its share, so the sum over ranks is the number of dropped samples.
        base, extra = divmod(total, self.world_size)
        self._dropped += base + (1 if self.rank < extra else 0)

    def _iterate(self, spec: PassSpec):
        if self.cfg.num_workers == 0:
            source = self._dataset.iter_pass(spec, 0)
        else:
            write_spec(self._spec_path, spec)
            source = iter(self._get_dataloader())
        expected = spec.first_batch
        # Batch b comes from worker b % num_workers, but DataLoader requests batches from the
        # workers in turn starting at worker 0. A pass resumed at an odd batch therefore arrives
        # pairwise swapped, so a batch waits here until the ones before it have been yielded.
        pending: dict[int, Batch] = {}
        for batch in source:
            if batch.pass_id != spec.pass_id or batch.index < expected or batch.index in pending:
                raise RuntimeError(
                    f"loader worker returned batch {batch.index} of pass "
                    f"{batch.pass_id}, expected batch {expected} of pass {spec.pass_id}"
                )
            pending[batch.index] = batch
            while expected in pending:
                batch = pending.pop(expected)
                expected += 1
                self._read.add(batch.counters)
                if self.cfg.num_workers == 0 and self.cfg.pin_memory and torch.cuda.is_available():
                    batch = batch.pin_memory()
                yield batch
        if pending:
            raise RuntimeError(
                f"loader workers skipped batch {expected} of pass {spec.pass_id} "
                f"but returned batches {sorted(pending)}"
            )
        if expected != self._pass.num_batches:
            raise RuntimeError(
                f"rank {self.rank} got {expected} batches of epoch {self.epoch}, "
                f"expected {self._pass.num_batches}"
            )

    def _get_dataloader(self) -> DataLoader:
        if self._dataloader is not None:
            return self._dataloader
        loader = DataLoader(
            self._dataset,
            batch_size=None,
            num_workers=self.cfg.num_workers,
            pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.cfg.persistent_workers,
            prefetch_factor=self.cfg.prefetch_batches,
            multiprocessing_context=self.cfg.multiprocessing_context,
        )
        if self.cfg.persistent_workers:
            self._dataloader = loader
        return loader

    # Consumption and state

    def mark_consumed(self, batch: Batch, step: int) -> None:
        """Record a batch as consumed by the training loop; call it after the optimizer step."""
        if batch.epoch != self.epoch or self._pass is None:
            raise ValueError(
                f"batch {batch.index} belongs to epoch {batch.epoch} but the loader "
                f"is in epoch {self.epoch}; mark batches before starting a new epoch"
            )
        for position in batch.positions[batch.positions >= 0].tolist():
            self._local.add_range(position, position + 1)
        valid_keys = [key for key, ok in zip(batch.keys, batch.valid.tolist()) if ok]
        self._samples_consumed += len(valid_keys)
        if self._audit is not None:
            self._audit.write(step, batch.epoch, valid_keys)
        if batch.index != self._pass.next_batch:
            log.warning(
                "rank %d marked batch %d consumed after batch %d",
                self.rank,
                batch.index,
                self._pass.next_batch - 1,
            )
        self._pass.next_batch = max(self._pass.next_batch, batch.index + 1)

    def batches_remaining(self) -> int:
        """Return how many batches the current pass still has (the next pass's if none runs)."""
        if self._pass is not None and not self._pass.finished:
            return self._pass.num_batches - self._pass.next_batch
        size = self.index.num_samples
        if self._pass is None:
            left = count_batches(
                size - len(self._base), self.world_size, self.cfg.batch_size, self.cfg.remainder
            )
            if left > 0:
                return left
        return count_batches(size, self.world_size, self.cfg.batch_size, self.cfg.remainder)

    def state_dict(self) -> dict:
        """Return the loader state; a collective when torch.distributed is initialised.

        The state is the epoch and the consumed positions of its plan as [start, end) intervals,
        identical on every rank and independent of world size and worker count.
        """
        consumed = IntervalSet(self._base.intervals())
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self._local.intervals())
            for intervals in gathered:
                consumed.update(IntervalSet(intervals))
        else:
            consumed.update(self._local)
        epoch = self.epoch
        if self._pass is not None and self._pass.finished:
            epoch, consumed = epoch + 1, IntervalSet()
        state = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "seed": self.cfg.seed,
            "epoch": epoch,
            "num_samples": self.index.num_samples,
            "index_fingerprint": self._fingerprint,
            "consumed": [list(interval) for interval in consumed.intervals()],
        }
        if self._pass is not None and not self._pass.finished:
            # Optional. A resume with the same layout settings continues this pass batch for batch,
            # and a resume with other settings ignores it and lays out the rest afresh.
            state["pass"] = {
                "layout": self._layout_settings(),
                "remaining": [list(interval) for interval in self._pass.remaining],
                "next_batch": self._pass.next_batch,
            }
        return state

    def _layout_settings(self) -> dict:
        """Return the settings that decide how a pass is dealt to ranks, workers and batches."""
        return {
            "world_size": self.world_size,
            "num_workers": self.cfg.num_workers,
            "batch_size": self.cfg.batch_size,
            "remainder": self.cfg.remainder,
            "max_run_length": self.cfg.max_run_length,
            "open_runs": self.cfg.open_runs,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue the saved epoch with exactly its unconsumed samples, at this world size."""
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise ValueError(
                f"not a loader state of format {STATE_FORMAT} version {STATE_VERSION} "
                f"(got {state.get('format')!r} version {state.get('version')!r})"
            )
        if state["seed"] != self.cfg.seed:
            raise ValueError(
                f"loader state was saved with seed {state['seed']} but LoaderConfig.seed "
                f"is {self.cfg.seed}; set seed={state['seed']} to continue its epoch"
            )
        if (state["num_samples"], state["index_fingerprint"]) != (
            self.index.num_samples,
            self._fingerprint,
        ):
            raise ValueError(
                f"loader state belongs to another data set ({state['num_samples']} "
                f"samples, index fingerprint {state['index_fingerprint']}) than "
                f"{self.index_url} ({self.index.num_samples}, {self._fingerprint})"
            )
        consumed = IntervalSet([tuple(pair) for pair in state["consumed"]])
        bad = [
            pair for pair in consumed.intervals() if pair[0] < 0 or pair[1] > self.index.num_samples
        ]
        if bad:
            raise ValueError(
                f"loader state has consumed intervals {bad} outside [0, {self.index.num_samples})"
            )
        self.epoch = int(state["epoch"])
        self._base = consumed
        self._local = IntervalSet()
        self._pass = None
        saved_pass = state.get("pass")
        if saved_pass is not None and saved_pass["layout"] == self._layout_settings():
            # Same layout settings: rebuild the interrupted pass and continue at its next batch, so
            # every rank gets the same batches, in the same order, as without the interruption.
            remaining = [tuple(pair) for pair in saved_pass["remaining"]]
            num_batches = count_batches(
                len(IntervalSet(remaining)), self.world_size, self.cfg.batch_size, self.cfg.remainder
            )
            self._pass = _Pass(self._pass_counter, remaining, num_batches, int(saved_pass["next_batch"]))

    def counters(self) -> dict[str, int]:
        """Return this rank's storage, skip, padding, drop and consumption counters."""
        return {
            "bytes_read": self._read.bytes_read,
            "retries": self._read.retries,
            "errors": self._read.errors,
            "corrupt_skipped": self._read.corrupt_skipped,
            "padded": self._padded,
            "dropped": self._dropped,
            "samples_consumed": self._samples_consumed,
        }

    def close(self) -> None:
        """Stop persistent workers, close the audit log and remove temporary files."""
        self._dataloader = None
        if self._audit is not None:
            self._audit.close()
            self._audit = None
        self._finalizer()

    def __enter__(self) -> StreamingLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
