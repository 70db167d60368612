"""Elastic, atomic DeepSpeed checkpoints for training runs.

Usage from a training loop (every method marked collective runs on every rank)::

    ckpt = CheckpointManager(run_dir, keep_last=3, mirror_url="s3://bucket/run1/checkpoints")
    ds_config = ckpt.prepare_ds_config(ds_config)        # collective, before deepspeed.initialize
    engine, *_ = deepspeed.initialize(model=model, config=ds_config, ...)
    client_state = ckpt.load(engine)                     # collective; None for a fresh run
    ...
    ckpt.save(engine, "kimg000120", {"kimg": 120.0})     # collective

Layout: checkpoints live in `<run_dir>/checkpoints/<tag>/` (DeepSpeed's files plus COMPLETE.json),
with `<run_dir>/checkpoints/latest_complete` naming the latest complete one. DeepSpeed's own
`latest` file is never written, so neither DeepSpeed nor this module can pick a half-written tag.
A checkpoint saved at another data-parallel world size is converted once to DeepSpeed's universal
format into `<tag>_universal/` and loaded from there.

The run directory must be visible to every rank (one machine, or a shared file system), because
DeepSpeed reads every rank's optimizer shard when it loads or converts a checkpoint. The manager
checks this on its first collective call.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ddn_dist.checkpointing import collective
from ddn_dist.checkpointing.export import consolidated_fp32_state_dict
from ddn_dist.checkpointing.layout import (
    FORMAT_VERSION,
    UNIVERSAL_SUFFIX,
    CompleteMarker,
    fsync_path,
    list_files,
    newest_complete,
    read_markers,
    remove_checkpoint,
    remove_checkpoint_dir,
    validate_tag,
    write_marker,
    write_pointer,
)
from ddn_dist.checkpointing.mirror import CheckpointMirror
from ddn_dist.checkpointing.universal import (
    complete_universal,
    convert_to_universal,
    needs_universal,
    universal_tag,
)

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
CLIENT_STATE_KEY = "ddn_client_state"
METADATA_KEY = "ddn_checkpoint"


@dataclass
class SavedCheckpoint:
    """Result of `CheckpointManager.save` on every rank."""

    tag: str
    path: str
    num_bytes: int
    seconds: float  # from the start of the save until the pointer names it (mirror upload excluded)


@dataclass
class ResumePlan:
    """Decision to load the latest checkpoint natively or from its universal conversion."""

    tag: str
    universal: bool


class CheckpointManager:
    """Saves, finds, converts, mirrors and loads DeepSpeed checkpoints of one run directory."""

    def __init__(
        self,
        run_dir: str,
        keep_last: int = 3,
        mirror_url: str | None = None,
        endpoint_url: str | None = None,
        fsync: bool = True,
    ):
        """Manage `<run_dir>/checkpoints`.

        keep_last: complete checkpoints kept locally and in the mirror (at least 1).
        mirror_url: directory URL (`s3://bucket/prefix` or a path) that receives a copy of each
            checkpoint.
        endpoint_url: S3 endpoint of the mirror; default AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL.
        fsync: flush every file to stable storage before a checkpoint is marked complete.
        """
        if "://" in str(run_dir) and not str(run_dir).startswith("file://"):
            raise ValueError(
                f"run_dir {run_dir!r} is not a local or shared file system path; DeepSpeed writes "
                "checkpoints through the file system. Pass a local run_dir and give the URL as "
                "mirror_url"
            )
        if not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an integer >= 1, got {keep_last!r}")
        self.run_dir = os.path.abspath(str(run_dir).removeprefix("file://"))
        self.checkpoint_dir = os.path.join(self.run_dir, CHECKPOINT_SUBDIR)
        self.keep_last = keep_last
        self.fsync = fsync
        self.mirror = CheckpointMirror(mirror_url, endpoint_url) if mirror_url else None
        self.mirror_failures = 0
        self._storage_checked = False
        self._mirror_checked = False
        self._plan: ResumePlan | None = None

    # ----- queries (local, not collective) -----

    def latest_tag(self) -> str | None:
        """Return the tag of the latest complete local checkpoint, or None.

        A checkpoint is complete when its COMPLETE.json exists and every listed file has the listed
        size. The mirror is not consulted; `prepare_ds_config` and `load` download from it.
        """
        marker = newest_complete(self.checkpoint_dir)
        return marker.tag if marker else None

    def export_fp32_state_dict(self, tag: str | None = None) -> dict:
        """Return the consolidated fp32 weights of `tag` (default: latest) without an engine."""
        tag = tag or self.latest_tag()
        if tag is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.checkpoint_dir}")
        return consolidated_fp32_state_dict(self.checkpoint_dir, tag)

    # ----- collectives -----

    def prepare_ds_config(self, ds_config: dict | str) -> dict:
        """Return a copy of `ds_config` ready to resume the latest checkpoint. Collective.

        Call after torch.distributed is initialised and before deepspeed.initialize. When the
        latest checkpoint was saved at another data-parallel world size or ZeRO stage, rank 0
        converts it to universal format and the returned config has
        `"checkpoint": {"load_universal": true}`.
        A finished conversion is reused. `ds_config` may be a dict or a JSON file path.
        """
        config = _load_config(ds_config)
        self._prepare_storage()
        self._fetch_from_mirror()
        marker = self._latest_marker_everywhere()
        if marker is None:
            self._plan = None
            return config

        stage = int(config.get("zero_optimization", {}).get("stage", 0))
        world_size = collective.world_size()
        universal = needs_universal(marker, world_size, stage)
        if universal:
            self._ensure_universal(marker)
            config.setdefault("checkpoint", {})["load_universal"] = True
            log.info(
                "checkpoint %s was saved at world size %d with ZeRO stage %d; resuming at world "
                "size %d with ZeRO stage %d from its universal conversion",
                marker.tag,
                marker.world_size,
                marker.zero_stage,
                world_size,
                stage,
            )
        self._plan = ResumePlan(tag=marker.tag, universal=universal)
        return config

    def load(self, engine) -> dict | None:
        """Load the latest complete checkpoint into `engine`. Collective.

        Returns the client_state given to `save`, or None when there is no checkpoint (a fresh run).
        Model weights, optimizer states (Adam moments), LR scheduler and DeepSpeed's step counters
        are restored.
        """
        self._prepare_storage()
        self._fetch_from_mirror()
        marker = self._latest_marker_everywhere()
        if marker is None:
            log.info("no checkpoint in %s; starting a fresh run", self.checkpoint_dir)
            return None

        universal = bool(engine.load_universal_checkpoint())
        world_size = int(engine.dp_world_size)
        stage = int(engine.zero_optimization_stage())
        if not universal and needs_universal(marker, world_size, stage):
            raise RuntimeError(
                f"checkpoint {marker.tag} was saved at world size {marker.world_size} with ZeRO "
                f"stage {marker.zero_stage} and this engine runs at world size {world_size} with "
                f"stage {stage}; pass the DeepSpeed config through "
                "CheckpointManager.prepare_ds_config before deepspeed.initialize"
            )
        load_tag = marker.tag
        if universal:
            self._ensure_universal(marker)
            load_tag = universal_tag(marker.tag)

        started = time.monotonic()
        try:
            load_path, state = engine.load_checkpoint(
                self.checkpoint_dir,
                tag=load_tag,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
        except RuntimeError as error:
            mismatch = _state_dict_mismatch(str(error))
            if mismatch is None:
                raise
            from ddn_dist.config import ConfigError

            raise ConfigError(
                f"checkpoint {marker.tag} in {self.checkpoint_dir} belongs to a model of another "
                f"shape ({mismatch}), so the model section differs from the one the run started "
                f"with (its config.yaml is next to checkpoints/). Resume with that model section, "
                f"or start a new run in another directory (train.run_dir=...)"
            ) from error
        if load_path is None or state is None:
            raise RuntimeError(
                f"DeepSpeed could not load checkpoint {self.checkpoint_dir}/{load_tag}"
            )
        if METADATA_KEY not in state:
            raise RuntimeError(f"checkpoint {load_path} was not written by CheckpointManager.save")
        log.info(
            "resumed from checkpoint %s (%s) in %.1f s",
            marker.tag,
            "universal" if universal else "native",
            time.monotonic() - started,
        )
        return state[CLIENT_STATE_KEY]

    def save(self, engine, tag: str, client_state: dict[str, Any] | None = None) -> SavedCheckpoint:
        """Save checkpoint `tag`, the latest once it is complete on every rank. Collective.

        Every rank writes its DeepSpeed files and flushes them. Then rank 0 writes COMPLETE.json,
        repoints latest_complete and deletes all but the newest `keep_last` complete checkpoints
        and any incomplete ones. Last, rank 0 uploads the new checkpoint to the mirror. A crash at
        any point leaves the previous checkpoint as the latest. An existing checkpoint with the same
        tag is deleted first, so a crash while replacing the latest tag falls back to the one
        before it.
        """
        validate_tag(tag)
        client_state = {} if client_state is None else client_state
        started = time.monotonic()
        self._prepare_storage()
        tag_dir = os.path.join(self.checkpoint_dir, tag)
        collective.run_on_rank0(
            lambda: remove_checkpoint(self.checkpoint_dir, tag), f"removing the old {tag_dir}"
        )

        state = {
            CLIENT_STATE_KEY: client_state,
            METADATA_KEY: {
                "format_version": FORMAT_VERSION,
                "tag": tag,
                "world_size": int(engine.dp_world_size),
                "zero_stage": int(engine.zero_optimization_stage()),
            },
            **_universal_checkpoint_info(),
        }
        # save_latest=False: DeepSpeed's `latest` file would name the tag before it is complete.
        engine.save_checkpoint(self.checkpoint_dir, tag=tag, client_state=state, save_latest=False)
        written = time.monotonic()
        if self.fsync:
            _fsync_my_share(tag_dir)
        collective.barrier()
        flushed = time.monotonic()

        marker = collective.run_on_rank0(lambda: self._commit(engine, tag), f"commit of {tag_dir}")
        seconds = time.monotonic() - started
        log.info(
            "saved checkpoint %s (%.1f MB) in %.2f s (DeepSpeed write %.2f s, fsync %.2f s, "
            "commit and prune %.2f s)",
            tag,
            marker.total_bytes / 1e6,
            seconds,
            written - started,
            flushed - written,
            started + seconds - flushed,
        )
        if self.mirror is not None and collective.rank() == 0:
            self._upload(marker)
        return SavedCheckpoint(tag=tag, path=tag_dir, num_bytes=marker.total_bytes, seconds=seconds)

    # ----- steps -----

    def _prepare_storage(self) -> None:
        """Create the checkpoint directory and check that every rank can read it."""
        if self._storage_checked:
            return
        collective.run_on_rank0(
            lambda: os.makedirs(self.checkpoint_dir, exist_ok=True),
            f"creating {self.checkpoint_dir}",
        )
        probe_name = collective.broadcast_from_rank0(f".probe-{uuid.uuid4().hex}")
        probe = os.path.join(self.checkpoint_dir, probe_name)
        collective.run_on_rank0(lambda: open(probe, "w").close(), f"writing {probe}")
        visible = collective.all_true(os.path.exists(probe))
        collective.barrier()
        collective.run_on_rank0(lambda: os.remove(probe), f"removing {probe}")
        if not visible:
            raise RuntimeError(
                f"checkpoint directory {self.checkpoint_dir} is not shared by all ranks (a file "
                "written by rank 0 is missing on another rank); put run_dir on a shared file system"
            )
        self._storage_checked = True

    def _fetch_from_mirror(self) -> None:
        """Download the mirror's latest checkpoint when the local directory has none (once)."""
        if self.mirror is None or self._mirror_checked:
            return
        collective.run_on_rank0(self._download_if_missing, f"download from {self.mirror.url}")
        self._mirror_checked = True

    def _latest_marker_everywhere(self) -> CompleteMarker | None:
        return collective.run_on_rank0(
            lambda: newest_complete(self.checkpoint_dir), f"search of {self.checkpoint_dir}"
        )

    def _ensure_universal(self, marker: CompleteMarker) -> None:
        if self._plan is not None and self._plan.tag == marker.tag and self._plan.universal:
            return

        def convert() -> None:
            if complete_universal(self.checkpoint_dir, marker.tag) is None:
                convert_to_universal(self.checkpoint_dir, marker.tag, marker)

        collective.run_on_rank0(convert, f"universal conversion of {marker.tag}")

    def _commit(self, engine, tag: str) -> CompleteMarker:
        tag_dir = os.path.join(self.checkpoint_dir, tag)
        files = list_files(tag_dir)
        if not files:
            raise RuntimeError(f"DeepSpeed wrote no files into {tag_dir}")
        sequences = [m.sequence for m in read_markers(self.checkpoint_dir)]
        marker = CompleteMarker(
            tag=tag,
            sequence=max(sequences, default=0) + 1,
            world_size=int(engine.dp_world_size),
            zero_stage=int(engine.zero_optimization_stage()),
            partitioned_optimizer=any(name.endswith("optim_states.pt") for name in files),
            files=files,
            saved_at_unix=time.time(),
        )
        write_marker(tag_dir, marker)
        write_pointer(self.checkpoint_dir, tag)
        self._prune(keep_tag=tag)
        return marker

    def _prune(self, keep_tag: str) -> None:
        """Delete all but the newest `keep_last` complete checkpoints, and incomplete ones."""
        complete = sorted(read_markers(self.checkpoint_dir), key=lambda m: m.sequence)
        kept_tags = {m.tag for m in complete[-self.keep_last :]} | {keep_tag}
        for name in sorted(os.listdir(self.checkpoint_dir)):
            path = os.path.join(self.checkpoint_dir, name)
            base = name.removesuffix(UNIVERSAL_SUFFIX)
            if not os.path.isdir(path) or base in kept_tags:
                continue
            if name.startswith(".probe-"):
                continue
            remove_checkpoint_dir(path)
            log.info("deleted checkpoint directory %s", path)

    def _upload(self, marker: CompleteMarker) -> None:
        started = time.monotonic()
        try:
            self.mirror.upload(os.path.join(self.checkpoint_dir, marker.tag), marker)
            kept_tags = {m.tag for m in read_markers(self.checkpoint_dir)}
            self.mirror.prune(kept_tags)
        except Exception as error:  # noqa: BLE001 - the local checkpoint stays complete
            self.mirror_failures += 1
            log.error(
                "mirroring checkpoint %s to %s failed (%d failures so far): %s; the local copy "
                "is complete and the next save uploads its own checkpoint",
                marker.tag,
                self.mirror.url,
                self.mirror_failures,
                error,
            )
            return
        log.info("mirror upload of %s took %.2f s", marker.tag, time.monotonic() - started)

    def _download_if_missing(self) -> None:
        if newest_complete(self.checkpoint_dir) is not None:
            return
        try:
            marker = self.mirror.newest()
        except Exception as error:
            # Starting fresh here could discard a run's progress, so an unreadable mirror is fatal.
            raise RuntimeError(
                f"no local checkpoint in {self.checkpoint_dir} and the mirror {self.mirror.url} "
                f"could not be read ({error}); check its endpoint and credentials, or set "
                "mirror_url=None to start without it"
            ) from error
        if marker is None:
            return
        log.info(
            "no local checkpoint in %s; downloading %s from %s",
            self.checkpoint_dir,
            marker.tag,
            self.mirror.url,
        )
        self.mirror.download(marker, self.checkpoint_dir)
        write_pointer(self.checkpoint_dir, marker.tag)


def _universal_checkpoint_info() -> dict:
    """Return the client-state entry that DeepSpeed's universal converter requires.

    DeepSpeed 0.19.8's ds_to_universal rejects ZeRO stage 1/2 checkpoints without it ("Required
    universal_checkpoint_info state is missing"); saving it makes --inject_missing_state unneeded.
    """
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    return {
        UNIVERSAL_CHECKPOINT_INFO: {
            UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE
        }
    }


def _load_config(ds_config: dict | str) -> dict:
    if isinstance(ds_config, dict):
        return copy.deepcopy(ds_config)
    if isinstance(ds_config, (str, os.PathLike)):
        with open(ds_config, encoding="utf-8") as f:
            return json.load(f)
    raise TypeError(f"ds_config must be a dict or a JSON file path, got {type(ds_config).__name__}")


def _fsync_my_share(tag_dir: str) -> None:
    """Flush this rank's share of the checkpoint files (every world_size-th file)."""
    names = sorted(list_files(tag_dir))
    rank, world_size = collective.rank(), collective.world_size()
    for name in names[rank::world_size]:
        fsync_path(os.path.join(tag_dir, name))
    fsync_path(tag_dir)


def _state_dict_mismatch(message: str) -> str | None:
    """Return the first line of a torch state-dict shape or key mismatch error, else None."""
    for line in message.splitlines():
        line = line.strip()
        if line.startswith(("size mismatch", "Missing key(s)", "Unexpected key(s)")):
            return line.rstrip(".")
    return None
