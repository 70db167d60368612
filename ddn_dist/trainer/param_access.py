"""Row copies of parameters and Adam states inside a DeepSpeed engine, for Split-and-Prune.

What DeepSpeed 0.19.8 does with its full-state accessors (read from `deepspeed/utils/tensor_fragment.py`
and `deepspeed/runtime/zero/stage3.py`, and checked by tests/test_train_split_prune.py):

- ZeRO stage 1 and 2 (and the bf16 optimizer at stage 0): every parameter has `_hp_mapping`.
  `safe_get_full_fp32_param` / `safe_get_full_optimizer_state` all-reduce the fp32 fragments over the
  data-parallel group, so they are collectives. `safe_set_full_*` writes only this rank's fragment of
  the fp32 master copy (no communication) and leaves the working weights (`param.data`, a full copy on
  every rank) untouched until the next step, so those rows are copied here as well.
- ZeRO stage 3: parameters have `ds_id`. The getters all-gather (collective). `safe_set_full_*`
  assumes the value splits evenly over ranks and fails on the last rank of a padded partition, so this
  module writes the local partition through `safe_set_local_*` instead, and also copies the rows into
  the working partition `param.ds_tensor`, which the fp32 master does not refresh until the next step,
  and into the full working copy of persistent parameters (those below
  `stage3_param_persistence_threshold`, which stay gathered between steps).
- Stage 0 with fp32: the getters return None because the engine wraps a plain torch optimizer; the
  rows are copied in `param.data` and in `optimizer.state[param]` directly.

Every rank must call `copy_rows` for the same parameters in the same order, because the getters are
collectives from stage 1 upwards.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.distributed as dist
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_optimizer_state,
)

log = logging.getLogger(__name__)

# Adam's per-element state tensors; the scalar `step` is left alone.
ADAM_STATE_KEYS = ("exp_avg", "exp_avg_sq")


def copy_tensor_rows(tensor: torch.Tensor, src_rows: list[int], dst_rows: list[int]) -> None:
    """Copy rows (dim 0) src -> dst in place, reading all sources before writing any destination."""
    if len(src_rows) != len(dst_rows):
        raise ValueError(f"row copy needs as many sources as destinations, got {src_rows} -> {dst_rows}")
    src = torch.as_tensor(src_rows, dtype=torch.long, device=tensor.device)
    dst = torch.as_tensor(dst_rows, dtype=torch.long, device=tensor.device)
    tensor.index_copy_(0, dst, tensor.index_select(0, src))


def local_partition(full: torch.Tensor, partition_numel: int, rank: int) -> torch.Tensor:
    """Return this rank's slice of a flattened tensor as ZeRO-3 partitions it (zero-padded at the end)."""
    flat = full.reshape(-1)
    start = partition_numel * rank
    part = torch.zeros(partition_numel, dtype=flat.dtype, device=flat.device)
    count = max(0, min(partition_numel, flat.numel() - start))
    if count > 0:
        part[:count] = flat[start : start + count]
    return part


def _row_numel(param: torch.nn.Parameter) -> int:
    return param.numel() // param.shape[0]


def _fragment(param, key):
    """Return (this rank's flat fp32 fragment of `key`, its start in the flat parameter), or None."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    if key is not None and not mapping.optim_fragment:
        return None
    address = mapping.lp_fragment_address
    return mapping.get_hp_fragment(key), address.start


def _gather_rows(param, key, rows: list[int]) -> torch.Tensor:
    """Return rows of the full fp32 tensor that this rank owns, zeros elsewhere (sum over ranks = rows)."""
    row = _row_numel(param)
    out = torch.zeros(len(rows) * row, dtype=torch.float32)
    found = _fragment(param, key)
    if found is None:
        return out
    fragment, start = found
    end = start + fragment.numel()
    for j, r in enumerate(rows):
        low, high = max(r * row, start), min((r + 1) * row, end)
        if low < high:
            out[j * row + low - r * row : j * row + high - r * row] = fragment.data[low - start : high - start]
    return out


def _scatter_rows(param, key, rows: list[int], values: torch.Tensor) -> None:
    """Write full rows into the part of this rank's fp32 fragment that they cover."""
    row = _row_numel(param)
    found = _fragment(param, key)
    if found is None:
        return
    fragment, start = found
    end = start + fragment.numel()
    for j, r in enumerate(rows):
        low, high = max(r * row, start), min((r + 1) * row, end)
        if low < high:
            source = values[j * row + low - r * row : j * row + high - r * row]
            fragment.data[low - start : high - start] = source


class DeepSpeedParamAccess:
    """`ParamAccess` for a DeepSpeed engine at ZeRO stage 0-3, fp32 or bf16.

    `on_copy` callbacks (for example the EMA) receive every row copy after the engine's own tensors
    have been updated, so they stay in step with each split.
    """

    def __init__(self, engine, on_copy: list[Callable[[torch.nn.Parameter, list[int], list[int]], None]]
                 | None = None):
        self.engine = engine
        self.stage = int(engine.zero_optimization_stage())
        self.on_copy = list(on_copy or [])
        self.copies = 0
        self._deferred: list[tuple[torch.nn.Parameter, list[int], list[int]]] | None = None

    def copy_rows(self, param: torch.nn.Parameter, src_rows: list[int], dst_rows: list[int]) -> None:
        """Copy rows src -> dst of the parameter, its fp32 master, its Adam states and the EMA."""
        if self.stage == 3:
            self._copy_rows_stage3(param, src_rows, dst_rows)
        elif self._deferred is not None and getattr(param, "_hp_mapping", False) is not False:
            copy_tensor_rows(param.data, src_rows, dst_rows)
            self._deferred.append((param, list(src_rows), list(dst_rows)))
        else:
            self._copy_rows_replicated(param, src_rows, dst_rows)
        for callback in self.on_copy:
            callback(param, src_rows, dst_rows)
        self.copies += 1

    def defer(self) -> None:
        """Collect the fp32-master and Adam-state copies of ZeRO 1/2 until `flush` (one all-reduce)."""
        self._deferred = []

    def flush(self) -> None:
        """Apply the collected copies with a single all-reduce. Collective when anything was collected.

        Every rank collects the same copies (identical S&P decisions), so either all ranks reach the
        all-reduce or none does.
        """
        requests, self._deferred = self._deferred or [], None
        if not requests:
            return
        keys = (None, *ADAM_STATE_KEYS)
        pieces = [_gather_rows(param, key, src) for param, src, _ in requests for key in keys]
        flat = torch.cat(pieces)
        if dist.is_initialized():
            dist.all_reduce(flat, group=getattr(requests[0][0], "_dp_group", None))
        offset = 0
        for param, _, dst in requests:
            for key in keys:
                count = len(dst) * _row_numel(param)
                _scatter_rows(param, key, dst, flat[offset : offset + count])
                offset += count

    def _copy_rows_replicated(self, param, src_rows, dst_rows) -> None:
        # Working weights are full on every rank below stage 3.
        copy_tensor_rows(param.data, src_rows, dst_rows)

        master = safe_get_full_fp32_param(param)
        if master is None:
            self._copy_rows_plain_optimizer(param, src_rows, dst_rows)
            return
        copy_tensor_rows(master, src_rows, dst_rows)
        safe_set_full_fp32_param(param, master)
        for key in ADAM_STATE_KEYS:
            state = safe_get_full_optimizer_state(param, key)
            if state is None:
                continue
            copy_tensor_rows(state, src_rows, dst_rows)
            safe_set_full_optimizer_state(param, state, key)

    def _copy_rows_plain_optimizer(self, param, src_rows, dst_rows) -> None:
        optimizer = self.engine.optimizer
        inner = getattr(optimizer, "optimizer", optimizer)
        state = inner.state.get(param, {})
        for key in ADAM_STATE_KEYS:
            value = state.get(key)
            if torch.is_tensor(value) and value.shape == param.shape:
                copy_tensor_rows(value, src_rows, dst_rows)

    def _copy_rows_stage3(self, param, src_rows, dst_rows) -> None:
        rank = dist.get_rank(group=param.ds_process_group) if dist.is_initialized() else 0
        partition_numel = param.ds_tensor.numel()

        master = safe_get_full_fp32_param(param)
        copy_tensor_rows(master, src_rows, dst_rows)
        local_master = local_partition(master, partition_numel, rank)
        safe_set_local_fp32_param(param, local_master)
        param.ds_tensor.data.copy_(local_master.to(param.ds_tensor.dtype))
        if param.data.numel() == param.ds_numel:
            # Persistent (small) parameters stay gathered between steps, so their full copy is live.
            copy_tensor_rows(param.data, src_rows, dst_rows)

        for key in ADAM_STATE_KEYS:
            state = safe_get_full_optimizer_state(param, key)
            if state is None:
                continue
            copy_tensor_rows(state, src_rows, dst_rows)
            safe_set_local_optimizer_state(param, local_partition(state, partition_numel, rank), key)
