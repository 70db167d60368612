"""The worker side of the loader: the batches one loader worker of one rank yields in a pass.

Every worker recomputes the pass layout from a small `PassSpec` (epoch, seed, remaining positions
and the shape of the job), takes its own stream of runs, interleaves them by a seeded k-way merge
and yields whole batches. Runs are fetched ahead on a thread pool, one ranged read each.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ddn_dist.data.index import ShardIndex
from ddn_dist.data.plan import (
    EpochPlan,
    IntervalSet,
    Run,
    batch_real_counts,
    layout_pass,
    merge_runs,
    worker_batches,
)
from ddn_dist.data.reader import (
    CorruptSample,
    DataCorruptionError,
    RawSample,
    ReadCounters,
    ReaderOptions,
    Sample,
    ShardReader,
)

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """One micro-batch of a rank.

    `images` is (B, C, H, W) float32 in [-1, 1]; `labels` (B,) long, -1 when unlabelled;
    `positions` (B,) long contains the epoch-plan position each slot was assigned, -1 for padding;
    `valid` (B,) bool is False for padding and for skipped corrupt samples, whose slots hold a
    duplicate of a valid sample of the same batch (or zeros when the batch has none); `keys` are
    the keys of the samples whose images fill the slots ("" for zeros).
    """

    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str]
    positions: torch.Tensor
    valid: torch.Tensor
    epoch: int
    index: int
    pass_id: int
    counters: ReadCounters = field(default_factory=ReadCounters)

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> Batch:
        """Return a copy with tensors in pinned memory (called by DataLoader's pin_memory)."""
        return replace(
            self,
            images=self.images.pin_memory(),
            labels=self.labels.pin_memory(),
            positions=self.positions.pin_memory(),
            valid=self.valid.pin_memory(),
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Return a copy with images and labels on `device`."""
        return replace(
            self,
            images=self.images.to(device, non_blocking=non_blocking),
            labels=self.labels.to(device, non_blocking=non_blocking),
        )


@dataclass
class PassSpec:
    """Everything a worker needs to compute its batches of one pass; small and picklable."""

    pass_id: int
    seed: int
    epoch: int
    remaining: list[tuple[int, int]]
    world_size: int
    rank: int
    num_workers: int
    batch_size: int
    remainder: str
    max_run_length: int
    open_runs: int
    prefetch_runs: int
    first_batch: int = 0


def write_spec(path: str, spec: PassSpec) -> None:
    """Write a pass spec atomically, so a worker never reads half of one."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".spec-")
    with os.fdopen(fd, "wb") as f:
        pickle.dump(spec, f)
    os.replace(tmp, path)


@dataclass
class _Slot:
    run: int  # index into the worker's runs, -1 for padding
    position: int  # epoch-plan position, -1 for padding


class PassDataset(IterableDataset):
    """Yields this worker's batches of the pass described by the spec file (or an explicit spec).

    The spec is read when iteration starts, so persistent workers see each new pass even though
    their copy of this object was made when they were forked.
    """

    def __init__(
        self,
        index: ShardIndex,
        index_url: str,
        options: ReaderOptions,
        on_corrupt: str,
        spec_path: str,
    ):
        self.index = index
        self.index_url = index_url
        self.options = options
        self.on_corrupt = on_corrupt
        self.spec_path = spec_path
        self._reader: ShardReader | None = None

    def __iter__(self):
        with open(self.spec_path, "rb") as f:
            spec: PassSpec = pickle.load(f)
        info = get_worker_info()
        return self.iter_pass(spec, info.id if info is not None else 0)

    def reader(self) -> ShardReader:
        """Return this process's shard reader, created on first use."""
        if self._reader is None:
            self._reader = ShardReader(self.index, self.index_url, self.options)
        return self._reader

    def iter_pass(self, spec: PassSpec, worker: int):
        """Yield the batches of worker `worker` of rank spec.rank, from spec.first_batch on."""
        plan = EpochPlan(self.index, spec.seed, spec.epoch)
        layout = layout_pass(
            plan,
            IntervalSet(spec.remaining),
            spec.world_size,
            spec.num_workers,
            spec.batch_size,
            spec.remainder,
            spec.max_run_length,
        )
        streams = max(spec.num_workers, 1)
        runs = layout.streams[spec.rank][worker]
        order = merge_runs(runs, spec.seed, spec.epoch, spec.rank, worker, spec.open_runs)
        real_counts = batch_real_counts(
            layout.real_counts[spec.rank], layout.num_batches, spec.batch_size
        )

        batches: list[tuple[int, list[_Slot]]] = []
        cursor = 0
        for b in worker_batches(layout.num_batches, streams, worker):
            taken = order[cursor : cursor + real_counts[b]]
            cursor += real_counts[b]
            slots = [_Slot(run, position) for run, position in taken]
            slots += [_Slot(-1, -1)] * (spec.batch_size - len(slots))
            if b >= spec.first_batch:
                batches.append((b, slots))
        if cursor != len(order):
            raise AssertionError(
                f"worker {worker} of rank {spec.rank} was dealt {len(order)} "
                f"samples but its batches hold {cursor}"
            )
        yield from self._read_batches(plan, runs, batches, spec)

    def _read_batches(
        self,
        plan: EpochPlan,
        runs: list[Run],
        batches: list[tuple[int, list[_Slot]]],
        spec: PassSpec,
    ):
        # Only the part of each run that the yielded batches use is read.
        first_needed: dict[int, int] = {}
        last_needed: dict[int, int] = {}
        need_order: list[int] = []
        for _, slots in batches:
            for slot in slots:
                if slot.run < 0:
                    continue
                if slot.run not in first_needed:
                    need_order.append(slot.run)
                    first_needed[slot.run] = slot.position
                first_needed[slot.run] = min(first_needed[slot.run], slot.position)
                last_needed[slot.run] = max(last_needed.get(slot.run, slot.position), slot.position)
        need_rank = {run: i for i, run in enumerate(need_order)}
        reader = self.reader()
        futures: dict[int, Future] = {}
        submitted = 0

        def fetch(run: int) -> list[RawSample | CorruptSample]:
            shard, sample = plan.locate(first_needed[run])
            return reader.read_samples(shard, sample, last_needed[run] - first_needed[run] + 1)

        # Every open run of the merge may be needed for the first batch, so all of them and the
        # prefetched ones are fetched concurrently (ranged reads wait on I/O, not on the CPU).
        with ThreadPoolExecutor(max_workers=min(spec.open_runs + spec.prefetch_runs, 32)) as pool:
            for batch_index, slots in batches:
                items: list[Sample | CorruptSample | None] = []
                for slot in slots:
                    if slot.run < 0:
                        items.append(None)
                        continue
                    ahead = need_rank[slot.run] + spec.open_runs + spec.prefetch_runs
                    while submitted < min(len(need_order), ahead):
                        futures[need_order[submitted]] = pool.submit(fetch, need_order[submitted])
                        submitted += 1
                    item = futures[slot.run].result()[slot.position - first_needed[slot.run]]
                    if isinstance(item, RawSample):
                        item = reader.decode(item.data, item.key, item.url)
                    items.append(item)
                    if slot.position == last_needed[slot.run]:
                        del futures[slot.run]
                yield self._assemble(items, slots, batch_index, spec)

    def _assemble(
        self,
        items: list[Sample | CorruptSample | None],
        slots: list[_Slot],
        batch_index: int,
        spec: PassSpec,
    ) -> Batch:
        info = self.index.dataset
        size = len(slots)
        images = torch.zeros(size, info.channels, info.resolution, info.resolution)
        labels = torch.full((size,), -1, dtype=torch.long)
        keys = [""] * size
        positions = torch.tensor([slot.position for slot in slots], dtype=torch.long)
        valid = torch.zeros(size, dtype=torch.bool)
        reader = self.reader()
        for i, item in enumerate(items):
            if isinstance(item, Sample):
                # uint8 [0, 255] -> float32 [-1, 1]
                images[i] = item.image.to(torch.float32) / 127.5 - 1.0
                labels[i] = item.label
                keys[i] = item.key
                valid[i] = True
            elif isinstance(item, CorruptSample):
                if self.on_corrupt == "raise":
                    raise DataCorruptionError(
                        f"{item.reason}; pass on_corrupt='skip' to skip and count such samples"
                    )
                log.warning("skipping corrupt sample: %s", item.reason)
                reader._count(corrupt_skipped=1)
        sources = valid.nonzero().flatten().tolist()
        # NOTE: a batch without any valid sample (pad rule with fewer remaining samples than
        # ranks, or every sample corrupt) keeps zero images, so trainers must mask by `valid`.
        if sources:
            for j, i in enumerate((~valid).nonzero().flatten().tolist()):
                source = sources[j % len(sources)]
                images[i] = images[source]
                labels[i] = labels[source]
                keys[i] = keys[source]
        return Batch(
            images,
            labels,
            keys,
            positions,
            valid,
            spec.epoch,
            batch_index,
            spec.pass_id,
            reader.take_counters(),
        )
