"""Process-group setup and the DeepSpeed engine built from a TrainConfig."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
from dataclasses import dataclass

import torch

from ddn_dist.config import ConfigError, TrainConfig

log = logging.getLogger(__name__)

# Launcher variables: torchrun sets the first, Slurm's srun the second of each pair.
RANK_VARIABLES = (
    ("RANK", "SLURM_PROCID"),
    ("LOCAL_RANK", "SLURM_LOCALID"),
    ("WORLD_SIZE", "SLURM_NTASKS"),
)


@dataclass
class DistInfo:
    """Position of this process in the job: ranks, node and device."""

    rank: int
    local_rank: int
    world_size: int
    node: str
    device: torch.device


def _env_int(names: tuple[str, str], default: int) -> int:
    for name in names:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return default


def resolve_ranks() -> tuple[int, int, int]:
    """Return (rank, local rank, world size) from torchrun or Slurm variables; (0, 0, 1) without."""
    rank = _env_int(RANK_VARIABLES[0], 0)
    local_rank = _env_int(RANK_VARIABLES[1], 0)
    world_size = _env_int(RANK_VARIABLES[2], 1)
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside world size {world_size}; "
                          "check the launcher variables")
    return rank, local_rank, world_size


def init_distributed(threads: int) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed: NCCL on GPUs, gloo on CPU."""
    import deepspeed

    rank, local_rank, world_size = resolve_ranks()
    # DeepSpeed reads the torchrun names, so copy Slurm's values over.
    os.environ["RANK"] = str(rank)
    os.environ["LOCAL_RANK"] = str(local_rank)
    os.environ["WORLD_SIZE"] = str(world_size)
    if world_size > 1 and ("MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ):
        raise ConfigError("MASTER_ADDR and MASTER_PORT must be set for a multi-process run "
                          "(torchrun sets them; under srun export them in the batch script)")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    torch.set_num_threads(threads)

    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device = torch.device("cpu")
        backend = "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    return DistInfo(rank, local_rank, world_size, socket.gethostname(), device)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_ds_config(cfg: TrainConfig, world_size: int) -> dict:
    """Return the DeepSpeed config: from deepspeed.config_file if given, completed from cfg."""
    micro, accum = cfg.resolve_batch(world_size)
    ds: dict = {}
    if cfg.deepspeed.config_file:
        with open(cfg.deepspeed.config_file) as handle:
            try:
                ds = json.load(handle)
            except json.JSONDecodeError as error:
                raise ConfigError(f"deepspeed.config_file {cfg.deepspeed.config_file} is not valid "
                                  f"JSON: {error}") from error
        _check_file_agrees(ds, cfg, micro, accum, world_size)

    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = accum
    ds["train_batch_size"] = micro * accum * world_size
    ds.setdefault("steps_per_print", 1 << 30)
    ds.setdefault("wall_clock_breakdown", False)
    ds.setdefault("gradient_clipping", 0.0)
    zero = ds.setdefault("zero_optimization", {})
    zero.setdefault("stage", cfg.deepspeed.stage)
    ds.setdefault("optimizer", {
        "type": "Adam",
        "params": {
            "lr": cfg.train.lr,
            "betas": list(cfg.train.betas),
            "eps": cfg.train.eps,
            "weight_decay": 0.0,
            "adam_w_mode": False,
            "torch_adam": cfg.deepspeed.torch_adam,
        },
    })
    if "bf16" not in ds and "fp16" not in ds:
        if cfg.deepspeed.precision == "bf16":
            # check_grad_overflow makes ZeRO skip a step whose gradients are not finite.
            ds["bf16"] = {"enabled": True, "check_grad_overflow": True}
        elif cfg.deepspeed.precision == "fp16":
            ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return ds


def _check_file_agrees(ds: dict, cfg: TrainConfig, micro: int, accum: int, world_size: int) -> None:
    """Reject a DeepSpeed file whose batch sizes contradict train.batch / deepspeed.micro_batch."""
    expected = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
    }
    for key, value in expected.items():
        if key in ds and ds[key] not in (value, "auto"):
            raise ConfigError(f"deepspeed.config_file sets {key}={ds[key]} but train.batch, "
                              f"deepspeed.micro_batch and world size {world_size} give {value}; "
                              f"remove the key from the file or set it to \"auto\"")


def zero_stage_of(ds_config: dict) -> int:
    """Return the ZeRO stage a DeepSpeed config selects."""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def precision_of(ds_config: dict) -> str:
    """Return fp32, bf16 or fp16 as selected by a DeepSpeed config."""
    if ds_config.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds_config.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


class _DataclassFields(dict):
    """A dataclass output unpacked into a dict, so that ZeRO-3's module hooks can see its tensors."""

    def __init__(self, output):
        super().__init__((f.name, getattr(output, f.name)) for f in dataclasses.fields(output))
        self.output_type = type(output)


def _unpack_dataclass_output(module, inputs, output):
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return _DataclassFields(output)
    return None


def _repack_dataclass_output(module, inputs, output):
    if isinstance(output, _DataclassFields):
        return output.output_type(**output)
    return None


def expose_dataclass_outputs(module: torch.nn.Module) -> None:
    """Let ZeRO-3 hook the tensors inside dataclass outputs (DDLOutput, LayerOutput).

    ZeRO-3 gathers a module's parameters for backward through hooks attached to the module's
    output tensors, and DeepSpeed 0.19.8 finds those only in tensors, tuples, lists and dicts.
    A DDL returns a dataclass, so without this its weight is still partitioned in backward
    ("The size of tensor a (0) must match ..."). Every submodule gets a forward hook that runs
    before DeepSpeed's and turns a dataclass output into a dict, and one that runs after
    DeepSpeed's and turns it back. Call it after deepspeed.initialize.
    """
    for submodule in module.modules():
        submodule.register_forward_hook(_unpack_dataclass_output, prepend=True)
        submodule.register_forward_hook(_repack_dataclass_output)


def build_engine(model: torch.nn.Module, ds_config: dict):
    """Wrap the model in a DeepSpeed engine with the optimizer the config defines."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=ds_config)
    if zero_stage_of(ds_config) == 3:
        expose_dataclass_outputs(engine.module)
    precision = precision_of(ds_config)
    if precision != "fp32":
        cast_float_buffers(engine.module, torch.bfloat16 if precision == "bf16" else torch.float16)
    return engine


def cast_float_buffers(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast floating-point buffers to the engine's half dtype.

    DeepSpeed 0.19.8 casts parameters but not buffers to bf16/fp16, and the DDN starts its feature
    map from the `initial_feature` buffer in that buffer's dtype, so a float32 buffer would meet
    bf16 GroupNorm weights ("mixed dtype (CPU): expect parameter to have scalar type of Float").
    """
    for submodule in module.modules():
        for name, buffer in submodule._buffers.items():
            if buffer is not None and buffer.is_floating_point():
                submodule._buffers[name] = buffer.to(dtype)


def set_learning_rate(engine, lr: float) -> None:
    """Set the learning rate of every parameter group of the engine's optimizer."""
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
