"""Exponential moving average of the weights, kept in step with Split-and-Prune row copies.

Below ZeRO stage 3 every rank holds full working weights, so the EMA is a full fp32 copy per rank.
At stage 3 each rank keeps the EMA of its own partition (`param.ds_tensor`) only, so the EMA costs
1/world-size of the model per rank; full tensors are all-gathered only for a row copy, a snapshot
or a checkpoint.

NOTE: the EMA follows the working weights, which are bf16 when training in bf16, so its inputs are
rounded to bf16 although it accumulates in fp32.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ddn_dist.trainer.param_access import copy_tensor_rows, local_partition


class WeightEMA:
    """EMA of a module's parameters (fp32), partition-local under ZeRO-3."""

    def __init__(self, module: torch.nn.Module, zero_stage: int):
        self.zero3 = zero_stage == 3
        self.names: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        for name, param in module.named_parameters():
            self.names.append(name)
            self.params.append(param)
        self.index = {id(p): i for i, p in enumerate(self.params)}
        self.shadow = [self._local(p).detach().float().clone() for p in self.params]

    def _local(self, param: torch.nn.Parameter) -> torch.Tensor:
        return param.ds_tensor if self.zero3 else param.data

    @torch.no_grad()
    def update(self, beta: float) -> None:
        """Blend the current weights in: ema = beta * ema + (1 - beta) * weights."""
        for shadow, param in zip(self.shadow, self.params):
            shadow.lerp_(self._local(param).float(), 1.0 - beta)

    def _gather(self, i: int) -> torch.Tensor:
        param = self.params[i]
        if not self.zero3:
            return self.shadow[i].clone()
        group = param.ds_process_group
        parts = [torch.empty_like(self.shadow[i]) for _ in range(dist.get_world_size(group=group))]
        dist.all_gather(parts, self.shadow[i], group=group)
        return torch.cat(parts)[: param.ds_numel].view(param.ds_shape)

    def _set_full(self, i: int, full: torch.Tensor) -> None:
        param = self.params[i]
        if not self.zero3:
            self.shadow[i].copy_(full.reshape(self.shadow[i].shape))
            return
        rank = dist.get_rank(group=param.ds_process_group)
        self.shadow[i].copy_(local_partition(full.float(), self.shadow[i].numel(), rank))

    @torch.no_grad()
    def copy_rows(self, param: torch.nn.Parameter, src_rows: list[int], dst_rows: list[int]) -> None:
        """Apply a Split-and-Prune row copy to the EMA. Collective at ZeRO-3."""
        i = self.index.get(id(param))
        if i is None:
            raise KeyError("row copy on a parameter that the EMA does not track")
        if not self.zero3:
            copy_tensor_rows(self.shadow[i], src_rows, dst_rows)
            return
        full = self._gather(i)
        copy_tensor_rows(full, src_rows, dst_rows)
        self._set_full(i, full)

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Return the full EMA weights by parameter name (CPU fp32). Collective at ZeRO-3."""
        return {name: self._gather(i).cpu() for i, name in enumerate(self.names)}

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore EMA weights saved by `full_state_dict`, at any world size."""
        missing = [name for name in self.names if name not in state]
        if missing:
            raise KeyError(f"EMA state lacks parameters {missing[:5]}; was it saved from this model?")
        for i, name in enumerate(self.names):
            self._set_full(i, state[name].to(self.shadow[i].device))
