"""Data prep jobs: planning, worker processes, array-job parts, resume and the final index.

The plan depends only on the input and the options, never on `--workers` or `--part`. Images are
taken in the source's sorted order (shuffled when a seed is given, then cut to `max_images`), and
chunk j contains the images at positions [j * shard_samples, (j + 1) * shard_samples). A chunk
becomes one shard, `shard-<j>.tar`, or several (`shard-<j>-01.tar`, ...) when `shard_bytes` cuts
it. Part I of N takes a contiguous range of chunks, so any split gives the same shards.

Each part records its shards in a part manifest once all of them are written, and the index is
built from the complete set of manifests (see `ddn_dist.data.prep.output`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from ddn_dist import storage
from ddn_dist.data.prep import writer
from ddn_dist.data.prep.output import (  # noqa: F401 - PREP_DIR and merge_index are re-exported
    PREP_DIR,
    PrepError,
    claim_output,
    hint_shard_count,
    manifest_url,
    merge_index,
    write_json,
)
from ddn_dist.data.prep.sources import (
    RESAMPLING_FILTER,
    BadImageError,
    ImageFormat,
    ImageSource,
    SourceError,
    open_source,
    process_image,
    resolve_format,
)

log = logging.getLogger(__name__)

ON_ERROR_CHOICES = ("skip", "stop")


@dataclass
class PrepOptions:
    """Options of a prep job. The fields up to `on_error` define the data set itself."""

    kind: str  # folder, zip, cifar10 or digits
    out: str  # directory URL or path for shards and index.json
    input_path: str | None = None
    split: str = "train"  # CIFAR-10 only: train, test or all
    resolution: int | None = None  # output side in pixels; None keeps the (square) input size
    color: str = "auto"  # auto (from the first image), rgb or gray
    seed: int | None = None  # shuffle the input order with this seed; None keeps sorted order
    max_images: int | None = None
    shard_samples: int = 1000  # images per shard at most
    shard_bytes: int | None = None  # tar bytes per shard at most (one larger image still fits)
    name: str | None = None
    on_error: str = "stop"  # stop at a bad image, or skip it and count it
    # How the job runs. These fields do not change the output.
    endpoint_url: str | None = None
    workers: int = 1
    part: int = 0
    num_parts: int = 1
    overwrite: bool = False
    progress: bool | None = None  # None: show a progress bar only on a terminal

    def validate(self) -> None:
        """Raise PrepError naming the first invalid option and its valid range."""
        scheme = self.out.split("://", 1)[0] if "://" in self.out else "file"
        if not self.out or scheme not in ("file", "s3"):
            # An empty --out would write into the working directory.
            raise PrepError(f"invalid --out {self.out!r}; pass a directory path, a file:// URL "
                            f"or s3://bucket/prefix")
        if scheme == "s3" and not self.out[len("s3://"):].split("/", 1)[0]:
            raise PrepError(f"invalid --out {self.out!r}: the bucket name is missing; "
                            f"pass s3://bucket/prefix")
        if scheme == "file":
            path = os.path.abspath(self.out.removeprefix("file://"))
            while not os.path.exists(path) and path != os.path.dirname(path):
                path = os.path.dirname(path)
            if not os.path.isdir(path):
                raise PrepError(f"invalid --out {self.out!r}: {path} is a file, not a directory; "
                                f"pass a directory path")
        if self.shard_samples < 1:
            raise PrepError(f"invalid --shard-samples {self.shard_samples}; pass 1 or more images")
        if self.shard_bytes is not None and self.shard_bytes < 1:
            raise PrepError(f"invalid --shard-bytes {self.shard_bytes}; pass a positive byte count")
        if self.max_images is not None and self.max_images < 1:
            raise PrepError(f"invalid --max-images {self.max_images}; pass 1 or more, or omit it")
        if self.workers < 1:
            raise PrepError(f"invalid --workers {self.workers}; pass 1 or more processes")
        if not 0 <= self.part < self.num_parts:
            raise PrepError(
                f"invalid --part {self.part}/{self.num_parts}; pass I/N with 0 <= I < N"
            )
        if self.on_error not in ON_ERROR_CHOICES:
            raise PrepError(f"invalid --on-error {self.on_error!r}; choose skip or stop")


@dataclass
class ChunkTask:
    """One chunk of the plan: its number and the source indices at its positions."""

    chunk: int
    first_position: int
    source_indices: list[int]


@dataclass
class ChunkResult:
    """Shards written and bad images skipped by a worker for one chunk."""

    chunk: int
    shards: list[writer.ShardResult]
    bad_images: list[str] = field(default_factory=list)


@dataclass
class PrepSummary:
    """Outcome of `run_prep`: counts for this part and the index URL when one was written."""

    images: int
    shards: int
    shards_skipped_existing: int
    bytes: int
    bad_images: int
    seconds: float
    index_url: str | None

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def shard_name(chunk: int, sub: int, width: int) -> str:
    """Return the file name of sub-shard `sub` of chunk `chunk`."""
    return f"shard-{chunk:0{width}d}.tar" if sub == 0 else f"shard-{chunk:0{width}d}-{sub:02d}.tar"


def plan_order(source: ImageSource, seed: int | None, max_images: int | None) -> list[int]:
    """Return the source indices in output order (sorted, or shuffled with `seed`), cut to max."""
    order = np.arange(len(source))
    if seed is not None:
        order = np.random.Generator(np.random.PCG64(seed)).permutation(order)
    if max_images is not None:
        order = order[:max_images]
    return [int(i) for i in order]


def plan_chunks(order: list[int], shard_samples: int) -> list[ChunkTask]:
    """Cut the output order into chunks of `shard_samples` positions."""
    return [
        ChunkTask(
            chunk=j, first_position=start, source_indices=order[start : start + shard_samples]
        )
        for j, start in enumerate(range(0, len(order), shard_samples))
    ]


def part_range(num_chunks: int, part: int, num_parts: int) -> range:
    """Return the chunks of part `part` of `num_parts` (contiguous, sizes differ by at most one)."""
    return range(num_chunks * part // num_parts, num_chunks * (part + 1) // num_parts)


def dataset_fingerprint(options: PrepOptions, source: ImageSource, fmt: ImageFormat) -> dict:
    """Return the options that define the output; equal dicts mean identical shards and index."""
    return {
        "source": source.kind,
        "input": os.path.basename(os.path.normpath(options.input_path))
        if options.input_path
        else None,
        "input_images": len(source),
        "split": options.split if source.kind == "cifar10" else None,
        "name": options.name or source.name,
        "resolution": fmt.resolution,
        "mode": fmt.mode,
        "resize": fmt.resize,
        "filter": RESAMPLING_FILTER if fmt.resize else None,
        "seed": options.seed,
        "max_images": options.max_images,
        "shard_samples": options.shard_samples,
        "shard_bytes": options.shard_bytes,
        "on_error": options.on_error,
    }


def fingerprint_digest(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------------------------ workers


@dataclass
class _WorkerContext:
    source: ImageSource
    fmt: ImageFormat
    options: PrepOptions
    key_width: int
    chunk_width: int
    aws_environment: dict[str, str] = field(default_factory=dict)


_CONTEXT: _WorkerContext | None = None


def _init_worker(context: _WorkerContext) -> None:
    global _CONTEXT
    _CONTEXT = context
    # A forkserver child inherits the environment of the server, which may predate changes made
    # in this process, so the AWS_* variables (credentials, endpoint, region) are copied over.
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        if name not in context.aws_environment:
            del os.environ[name]
    os.environ.update(context.aws_environment)


def _encode_chunk(task: ChunkTask) -> ChunkResult:
    """Read, convert and encode the images of one chunk, then write its shard(s)."""
    ctx = _CONTEXT
    assert ctx is not None, "worker context not initialised"
    bad_images: list[str] = []
    encoded: list[tuple[writer.EncodedSample, np.ndarray]] = []
    for offset, source_index in enumerate(task.source_indices):
        description = ctx.source.describe(source_index)
        try:
            pixels = process_image(ctx.source.read(source_index), ctx.fmt, description)
        except BadImageError as error:
            if ctx.options.on_error == "stop":
                raise PrepError(f"{error}; pass --on-error skip to skip bad images") from error
            log.warning("skipped bad image: %s", error)
            bad_images.append(str(error))
            continue
        key = f"{task.first_position + offset:0{ctx.key_width}d}"
        label = ctx.source.label(source_index)
        encoded.append((writer.EncodedSample(key, writer.encode_png(pixels), label), pixels))

    shards = []
    retry = storage.RetryPolicy()
    for sub, group in enumerate(_split_by_bytes(encoded, ctx.options.shard_bytes)):
        stats = writer.PixelStats(ctx.fmt.channels)
        for _, pixels in group:
            stats.add(pixels)
        name = shard_name(task.chunk, sub, ctx.chunk_width)
        url = storage.join_url(ctx.options.out, name)
        samples = [sample for sample, _ in group]
        shards.append(
            writer.write_shard(url, name, samples, stats, ctx.options.endpoint_url, retry)
        )
    return ChunkResult(task.chunk, shards, bad_images)


def _split_by_bytes(encoded: list, shard_bytes: int | None) -> list[list]:
    """Cut a chunk's samples into groups whose tar size stays within `shard_bytes`.

    A group always takes at least one sample, so a single sample larger than the limit still
    gets a shard of its own.
    """
    if shard_bytes is None:
        return [encoded] if encoded else []
    groups: list[list] = []
    current: list = []
    tar_bytes = writer.TAR_END_BYTES
    for item in encoded:
        size = writer.sample_tar_bytes(item[0])
        if current and tar_bytes + size > shard_bytes:
            groups.append(current)
            current, tar_bytes = [], writer.TAR_END_BYTES
        current.append(item)
        tar_bytes += size
    if current:
        groups.append(current)
    return groups


def _run_chunks(context: _WorkerContext, tasks: list[ChunkTask], progress: tqdm):
    """Yield ChunkResults in chunk order, from this process or from a pool of workers."""
    if context.options.workers == 1 or len(tasks) <= 1:
        _init_worker(context)
        for task in tasks:
            result = _encode_chunk(task)
            progress.update(len(task.source_indices))
            yield result
        return
    # Not fork: this process runs the fsspec IO thread, and a fork copies any lock that thread
    # holds in the locked state. With fork, one test run on Ceph RGW hung on an S3 request.
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])
    else:
        ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(context.options.workers, initializer=_init_worker, initargs=(context,)) as pool:
        for task, result in zip(tasks, pool.imap(_encode_chunk, tasks, chunksize=1)):
            progress.update(len(task.source_indices))
            yield result


@dataclass
class _Plan:
    """The opened source, output format, fingerprint and the chunks of this part."""

    source: ImageSource
    fmt: ImageFormat
    fingerprint: dict
    digest: str
    num_images: int
    num_chunks: int
    tasks: list[ChunkTask]


def _make_plan(options: PrepOptions) -> _Plan:
    try:
        source = open_source(options.kind, options.input_path, options.split, options.name)
        order = plan_order(source, options.seed, options.max_images)
        fmt = resolve_format(source, order, options.resolution, options.color)
    except SourceError as error:
        raise PrepError(str(error)) from error
    fingerprint = dataset_fingerprint(options, source, fmt)
    chunks = plan_chunks(order, options.shard_samples)
    tasks = [chunks[j] for j in part_range(len(chunks), options.part, options.num_parts)]
    return _Plan(
        source, fmt, fingerprint, fingerprint_digest(fingerprint), len(order), len(chunks), tasks
    )


def _part_manifest(
    options: PrepOptions, plan: _Plan, shards: list[writer.ShardResult], bad_images: list[str]
) -> dict:
    stats = writer.PixelStats(plan.fmt.channels)
    for shard in shards:
        stats.merge(shard.stats)
    return {
        "fingerprint": plan.digest,
        "part": options.part,
        "num_parts": options.num_parts,
        "dataset": {
            "name": plan.fingerprint["name"],
            "resolution": plan.fmt.resolution,
            "channels": plan.fmt.channels,
            "has_labels": plan.source.num_classes > 0,
            "num_classes": plan.source.num_classes,
            "options": plan.fingerprint,
        },
        "shards": [dataclasses.asdict(s.entry) for s in shards],
        "stats": stats.to_dict(),
        "bad_images": bad_images,
    }


def run_prep(options: PrepOptions) -> PrepSummary:
    """Prepare the shards of one part and write its manifest; with a single part, also the index.

    Rerunning skips shards already present with the right bytes.
    """
    options.validate()
    storage.require_credentials(options.out)
    started = time.perf_counter()
    plan = _make_plan(options)
    claim_output(
        options.out, options.endpoint_url, plan.digest, options.overwrite, options.num_parts
    )
    hint_shard_count(plan.num_images, plan.num_chunks)
    part_images = sum(len(t.source_indices) for t in plan.tasks)
    log.info(
        "preparing %s: part %d/%d, %d of %d images in %d chunks, %dx%d %s, %d worker(s), out %s",
        plan.fingerprint["name"],
        options.part,
        options.num_parts,
        part_images,
        plan.num_images,
        len(plan.tasks),
        plan.fmt.resolution,
        plan.fmt.resolution,
        plan.fmt.mode,
        options.workers,
        options.out,
    )

    context = _WorkerContext(
        source=plan.source,
        fmt=plan.fmt,
        options=options,
        key_width=max(6, len(str(max(plan.num_images - 1, 0)))),
        chunk_width=max(6, len(str(max(plan.num_chunks - 1, 0)))),
        aws_environment={k: v for k, v in os.environ.items() if k.startswith("AWS_")},
    )
    show = sys.stderr.isatty() if options.progress is None else options.progress
    shards: list[writer.ShardResult] = []
    bad_images: list[str] = []
    with tqdm(total=part_images, unit="img", disable=not show, desc="prep") as progress:
        for result in _run_chunks(context, plan.tasks, progress):
            shards.extend(result.shards)
            bad_images.extend(result.bad_images)

    manifest = _part_manifest(options, plan, shards, bad_images)
    write_json(
        manifest_url(options.out, options.part, options.num_parts), manifest, options.endpoint_url
    )
    index_url = None
    if options.num_parts == 1:
        index_url = merge_index(options.out, options.endpoint_url)

    summary = PrepSummary(
        images=sum(s.entry.num_samples for s in shards),
        shards=len(shards),
        shards_skipped_existing=sum(s.skipped_existing for s in shards),
        bytes=sum(s.entry.num_bytes for s in shards),
        bad_images=len(bad_images),
        seconds=time.perf_counter() - started,
        index_url=index_url,
    )
    next_step = (
        f", index {index_url}"
        if index_url
        else (f"; run `ddn prep merge-index {options.out}` after all parts")
    )
    log.info(
        "prep done: %d images, %d shards (%d already present), %d bytes, %d bad images skipped, "
        "%.1f images/s%s",
        summary.images,
        summary.shards,
        summary.shards_skipped_existing,
        summary.bytes,
        summary.bad_images,
        summary.images_per_second,
        next_step,
    )
    return summary
