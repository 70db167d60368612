"""Conversion of a native DeepSpeed ZeRO checkpoint to DeepSpeed's universal checkpoint format.

DeepSpeed 0.19.8 refuses to load the optimizer states of a native ZeRO checkpoint at another
data-parallel world size ("Automatic adjustment of ZeRO's optimizer state partitioning with a new
world size is not currently supported"). Its universal format stores every parameter and Adam
state unpartitioned, and an engine built with `"checkpoint": {"load_universal": true}` loads it
at any world size.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import time
import uuid
from dataclasses import replace

from ddn_dist.checkpointing.layout import (
    UNIVERSAL_SUFFIX,
    CompleteMarker,
    fsync_path,
    list_files,
    read_marker,
    verify_files,
    write_marker,
)

log = logging.getLogger(__name__)


def universal_tag(tag: str) -> str:
    """Return the directory name of the universal conversion of `tag`."""
    return tag + UNIVERSAL_SUFFIX


def complete_universal(root: str, tag: str) -> CompleteMarker | None:
    """Return the marker of a finished, intact conversion of `tag`, else None."""
    directory = os.path.join(root, universal_tag(tag))
    marker = read_marker(directory)
    if marker is None or marker.kind != "universal" or verify_files(directory, marker):
        return None
    return marker


def convert_to_universal(root: str, tag: str, source: CompleteMarker) -> CompleteMarker:
    """Convert `<root>/<tag>` into `<root>/<tag>_universal` and return the new marker.

    The conversion runs in a scratch directory and is renamed into place with its marker, so an
    interrupted conversion is never taken for a finished one. DeepSpeed's converter also writes a
    `latest_universal` file next to its output; that file stays in the scratch directory.
    """
    from deepspeed.checkpoint import ds_to_universal

    started = time.monotonic()
    scratch = os.path.join(root, f".convert-{tag}-{uuid.uuid4().hex[:8]}")
    output = os.path.join(scratch, universal_tag(tag))
    final = os.path.join(root, universal_tag(tag))
    # One worker: the conversion runs inside a training process, where forking a pool is unsafe.
    args = argparse.Namespace(
        input_folder=os.path.join(root, tag),
        output_folder=output,
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    converter_output = io.StringIO()
    try:
        os.makedirs(scratch)
        with contextlib.redirect_stdout(converter_output):
            ds_to_universal.main(args)
        for parent, _, names in os.walk(output):
            for name in names:
                fsync_path(os.path.join(parent, name))
        marker = replace(
            source, kind="universal", files=list_files(output), saved_at_unix=time.time()
        )
        write_marker(output, marker)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.rename(output, final)
        fsync_path(root)
    except Exception:
        log.error(
            "conversion of checkpoint %s to universal format failed; converter output:\n%s",
            os.path.join(root, tag),
            converter_output.getvalue()[-4000:],
        )
        raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info(
        "converted checkpoint %s (world size %d, ZeRO stage %d) to universal format in %.1f s",
        tag,
        source.world_size,
        source.zero_stage,
        time.monotonic() - started,
    )
    return marker


def needs_universal(marker: CompleteMarker, world_size: int, zero_stage: int) -> bool:
    """Return True when `marker`'s checkpoint must be loaded from universal format.

    Raises ValueError for a ZeRO stage change to or from stage 0, which neither format supports.
    """
    if marker.world_size == world_size and marker.zero_stage == zero_stage:
        return False
    if marker.zero_stage == 0 and zero_stage == 0:
        # Stage 0 keeps whole optimizer states in mp_rank_00_model_states.pt, so any size loads it.
        return False
    if marker.zero_stage == 0 or zero_stage == 0:
        raise ValueError(
            f"checkpoint {marker.tag} was saved with ZeRO stage {marker.zero_stage} and cannot be "
            f"resumed with ZeRO stage {zero_stage}: DeepSpeed converts only ZeRO stage 1-3 "
            f"checkpoints between stages; resume with zero_optimization.stage={marker.zero_stage}"
        )
    return True
