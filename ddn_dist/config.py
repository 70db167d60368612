"""Typed training configuration: YAML file plus `section.key=value` overrides.

Every section is a dataclass with typed defaults. `load_config` rejects unknown sections and keys,
values of the wrong type and values outside their valid choices, naming the valid ones, before any
worker touches data. The `model:` section is validated by `ddn_dist.model.ModelConfig.from_dict`.
The batch arithmetic that depends on the world size is checked by `TrainConfig.resolve_batch`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

PRECISIONS = ("fp32", "bf16", "fp16")
ZERO_STAGES = (0, 1, 2, 3)
REMAINDER_POLICIES = ("drop", "pad")
CORRUPT_POLICIES = ("skip", "raise")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(ValueError):
    """Invalid configuration file, override, key or value."""


@dataclass
class DataSection:
    """Shard location and streaming-loader options."""

    data: str = ""
    """Data set location: a local directory or `s3://bucket/prefix` holding index.json and shards."""
    endpoint_url: str | None = None
    """S3 endpoint URL; None takes AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL from the environment."""
    num_workers: int = 2
    """Loader worker processes per rank."""
    seed: int = 0
    """Seed of the shuffle order (the same on every rank)."""
    remainder: str = "drop"
    """Policy for the end of an epoch that does not fill a round of micro-batches: drop or pad."""
    on_corrupt: str = "skip"
    """Policy for an undecodable sample: skip (and count it) or raise."""
    audit_dir: str | None = None
    """Directory for per-rank JSONL logs of every consumed sample; None disables the audit."""
    pin_memory: bool = False
    persistent_workers: bool = False


@dataclass
class TrainSection:
    """Schedule in images (EDM style), optimiser, EMA, logging intervals and run directory."""

    run_dir: str = "runs/ddn"
    """Run directory for checkpoints, stats.jsonl, sample grids and snapshots."""
    batch: int = 2048
    """Global batch in images (= micro-batch x gradient accumulation x world size)."""
    duration_kimg: float = 200_000.0
    """Training length in thousands of images."""
    lr: float = 1e-3
    """Adam learning rate after the warm-up."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    lr_warmup_kimg: float = 10_000.0
    """Linear learning-rate warm-up from 0, in thousands of images; constant afterwards."""
    ema_halflife_kimg: float = 0.0
    """EMA half-life in thousands of images; 0 disables the EMA."""
    sp_warmup_kimg: float = 0.0
    """Thousands of images to see before Split-and-Prune may act."""
    tick_kimg: float = 10.0
    """Status line and stats.jsonl record every this many thousand images."""
    snapshot_kimg: float = 1000.0
    """Inference snapshot and sample grid every this many thousand images; 0 disables."""
    snapshot_minutes: float = 0.0
    """Also snapshot after this many minutes since the last one; 0 disables."""
    checkpoint_kimg: float = 1000.0
    """Checkpoint every this many thousand images; 0 disables."""
    checkpoint_minutes: float = 30.0
    """Also checkpoint after this many minutes since the last one; 0 disables."""
    grid_size: int = 8
    """Sample grids are grid_size x grid_size images."""
    grid_seed: int = 0
    """Seed of the sample grids, fixed so grids are comparable across snapshots."""
    seed: int = 0
    """Seed of the model initialisation and of the chain-dropout random stream."""
    max_nonfinite_steps: int = 10
    """Stop after this many consecutive steps with a non-finite loss or gradient."""
    stop_at_step: int = 0
    """Save a checkpoint and exit after this optimizer step (0 disables); for staged runs and tests."""
    nonfinite_at_steps: list[int] = field(default_factory=list)
    """Fault injection: make the loss NaN on rank 0 at these optimizer steps (tests only)."""
    threads: int = 1
    """torch intra-op threads per rank (OMP_NUM_THREADS)."""


@dataclass
class DeepSpeedSection:
    """ZeRO stage, precision and micro-batch; or a DeepSpeed JSON file that the trainer completes."""

    stage: int = 2
    precision: str = "fp32"
    micro_batch: int = 32
    """Images per rank per forward pass."""
    grad_accum: int = 0
    """Gradient accumulation steps; 0 derives it from train.batch, micro_batch and the world size."""
    config_file: str | None = None
    """DeepSpeed JSON config used as the base; batch sizes and the optimiser are filled in."""
    torch_adam: bool = True
    """Use torch.optim.Adam inside DeepSpeed (no FusedAdam compile on CPU)."""


@dataclass
class CheckpointSection:
    """Checkpoint retention and remote mirror."""

    keep_last: int = 3
    mirror_url: str | None = None
    """`s3://` URL that receives a copy of every complete checkpoint; None disables."""
    endpoint_url: str | None = None


@dataclass
class MetricsSection:
    """Prometheus exporter of each rank."""

    enabled: bool = False
    port_base: int = 9400
    """Each rank serves /metrics on port_base + local rank."""
    bind_address: str = "0.0.0.0"
    sd_dir: str | None = None
    """Directory for Prometheus file service-discovery targets; None disables."""
    target_host: str | None = None
    """Host written into the service-discovery target; None uses the node name."""


@dataclass
class LoggingSection:
    """Logging of the training processes."""

    level: str = "INFO"


@dataclass
class TrainConfig:
    """The whole training configuration."""

    model: dict = field(default_factory=dict)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    logging: LoggingSection = field(default_factory=LoggingSection)

    def to_dict(self) -> dict:
        """Return the resolved configuration as plain data (YAML/JSON serialisable)."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def config_hash(self) -> str:
        """Hash of the settings that change what is trained (not paths, logging or stop points)."""
        data = self.to_dict()
        for section, key in HASH_EXCLUDED:
            data[section].pop(key, None)
        for section in ("checkpoint", "metrics", "logging"):
            data.pop(section)
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def resolve_batch(self, world_size: int) -> tuple[int, int]:
        """Return (micro-batch, gradient accumulation) for `world_size`; raise ConfigError if inconsistent."""
        micro = self.deepspeed.micro_batch
        batch = self.train.batch
        per_step = micro * world_size
        if self.deepspeed.grad_accum > 0:
            accum = self.deepspeed.grad_accum
            if micro * accum * world_size != batch:
                raise ConfigError(
                    f"train.batch={batch} must equal deepspeed.micro_batch ({micro}) x "
                    f"deepspeed.grad_accum ({accum}) x world size ({world_size}) = "
                    f"{micro * accum * world_size}; set deepspeed.grad_accum=0 to derive it"
                )
            return micro, accum
        if batch % per_step != 0:
            raise ConfigError(
                f"train.batch={batch} is not a multiple of deepspeed.micro_batch ({micro}) x world size "
                f"({world_size}) = {per_step}; choose a batch divisible by {per_step} or another micro_batch"
            )
        return micro, batch // per_step


# Keys left out of the config hash: they change where output goes or when a run stops, not the result.
HASH_EXCLUDED = [
    ("train", "run_dir"),
    ("train", "duration_kimg"),
    ("train", "stop_at_step"),
    ("train", "tick_kimg"),
    ("train", "snapshot_kimg"),
    ("train", "snapshot_minutes"),
    ("train", "checkpoint_kimg"),
    ("train", "checkpoint_minutes"),
    ("train", "threads"),
    ("data", "data"),
    ("data", "endpoint_url"),
    ("data", "num_workers"),
    ("data", "audit_dir"),
    ("data", "pin_memory"),
    ("data", "persistent_workers"),
    ("deepspeed", "config_file"),
    # The global batch (train.batch) fixes the optimisation; its split into micro-batches does not.
    ("deepspeed", "micro_batch"),
    ("deepspeed", "grad_accum"),
]

SECTION_TYPES = {
    "data": DataSection,
    "train": TrainSection,
    "deepspeed": DeepSpeedSection,
    "checkpoint": CheckpointSection,
    "metrics": MetricsSection,
    "logging": LoggingSection,
}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, where: str):
    """Check `value` against the annotation `tp`, converting int -> float; raise ConfigError otherwise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list of {_type_name(item_type)}, got {value!r}")
        return [_coerce(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads exponents without a dot (5e-4) as strings.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def _build_section(cls, raw: dict, name: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"section {name!r} must be a mapping of keys to values, got {raw!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in valid:
            raise ConfigError(f"unknown key {name}.{key}; valid keys of {name}: {', '.join(valid)}")
        values[key] = _coerce(value, hints[key], f"{name}.{key}")
    return cls(**values)


def _check_choice(value, choices, where: str) -> None:
    if value not in choices:
        listed = ", ".join(str(c) for c in choices)
        raise ConfigError(f"{where}={value!r} is invalid; valid choices: {listed}")


def _check_positive(value, where: str, allow_zero: bool = False) -> None:
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        finite = " and finite" if isinstance(value, float) else ""
        raise ConfigError(f"{where}={value!r} is invalid; it must be {bound}{finite}")


def validate(cfg: TrainConfig) -> None:
    """Check value ranges and choices that the types alone do not capture."""
    _check_choice(cfg.deepspeed.stage, ZERO_STAGES, "deepspeed.stage")
    _check_choice(cfg.deepspeed.precision, PRECISIONS, "deepspeed.precision")
    _check_choice(cfg.data.remainder, REMAINDER_POLICIES, "data.remainder")
    _check_choice(cfg.data.on_corrupt, CORRUPT_POLICIES, "data.on_corrupt")
    _check_choice(cfg.logging.level.upper(), LOG_LEVELS, "logging.level")
    if cfg.deepspeed.precision == "fp16" and cfg.deepspeed.stage == 0:
        raise ConfigError(
            "deepspeed.precision=fp16 needs deepspeed.stage 1, 2 or 3, because Split-and-Prune cannot "
            "reach the fp32 master weights of DeepSpeed's stage-0 fp16 optimizer; use bf16 or fp32"
        )
    if not cfg.data.data:
        raise ConfigError("data.data is missing: set it to the shard directory or s3:// URL")
    for where, value in [
        ("train.batch", cfg.train.batch),
        ("train.duration_kimg", cfg.train.duration_kimg),
        ("train.lr", cfg.train.lr),
        ("train.eps", cfg.train.eps),
        ("train.tick_kimg", cfg.train.tick_kimg),
        ("train.grid_size", cfg.train.grid_size),
        ("train.max_nonfinite_steps", cfg.train.max_nonfinite_steps),
        ("train.threads", cfg.train.threads),
        ("deepspeed.micro_batch", cfg.deepspeed.micro_batch),
        ("checkpoint.keep_last", cfg.checkpoint.keep_last),
    ]:
        _check_positive(value, where)
    for where, value in [
        ("train.lr_warmup_kimg", cfg.train.lr_warmup_kimg),
        ("train.ema_halflife_kimg", cfg.train.ema_halflife_kimg),
        ("train.sp_warmup_kimg", cfg.train.sp_warmup_kimg),
        ("train.snapshot_kimg", cfg.train.snapshot_kimg),
        ("train.snapshot_minutes", cfg.train.snapshot_minutes),
        ("train.checkpoint_kimg", cfg.train.checkpoint_kimg),
        ("train.checkpoint_minutes", cfg.train.checkpoint_minutes),
        ("train.stop_at_step", cfg.train.stop_at_step),
        ("data.num_workers", cfg.data.num_workers),
        ("deepspeed.grad_accum", cfg.deepspeed.grad_accum),
    ]:
        _check_positive(value, where, allow_zero=True)
    if len(cfg.train.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.train.betas):
        raise ConfigError(f"train.betas={cfg.train.betas!r} is invalid; give two numbers in [0, 1)")
    if cfg.deepspeed.config_file is not None and not Path(cfg.deepspeed.config_file).is_file():
        raise ConfigError(f"deepspeed.config_file={cfg.deepspeed.config_file!r} was not found")
    if not 0 <= cfg.metrics.port_base < 65536:
        raise ConfigError(f"metrics.port_base={cfg.metrics.port_base} is invalid; use 1-65535, "
                          "or 0 to let every rank take a free port")


def parse_override(text: str) -> tuple[list[str], object]:
    """Split `section.key=value` into (["section", "key"], value), parsing the value as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is invalid; write section.key=value, e.g. train.lr=5e-4")
    path, raw = text.split("=", 1)
    keys = path.strip().split(".")
    if len(keys) < 2 or not all(keys):
        raise ConfigError(f"override {text!r} is invalid; the key needs a section, e.g. train.batch=256")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        reason = describe_yaml_error(error)
        raise ConfigError(f"override {text!r}: value is not valid YAML ({reason})") from error
    return keys, value


def apply_override(raw: dict, keys: list[str], value) -> None:
    """Set `raw[k0][k1]... = value`, creating sections as needed (keys are validated later)."""
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {'.'.join(keys)}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def config_from_dict(raw: dict) -> TrainConfig:
    """Build and validate a TrainConfig from plain data (a parsed YAML file)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    valid = ["model", *SECTION_TYPES]
    for name in raw:
        if name not in valid:
            raise ConfigError(f"unknown section {name!r}; valid sections: {', '.join(valid)}")
    sections = {name: _build_section(cls, raw.get(name) or {}, name) for name, cls in SECTION_TYPES.items()}
    model = raw.get("model") or {}
    if not isinstance(model, dict):
        raise ConfigError(f"section 'model' must be a mapping, got {model!r}")
    cfg = TrainConfig(model=dict(model), **sections)
    validate(cfg)
    return cfg


def describe_yaml_error(error: yaml.YAMLError) -> str:
    """Return the parser's problem and position on one line (str(error) spans several)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or " ".join(str(error).split())
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML config, apply `section.key=value` overrides, validate, and return it."""
    raw: dict = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError as error:
            raise ConfigError(f"config file {path} was not found; see configs/ for presets") from error
        except IsADirectoryError as error:
            raise ConfigError(
                f"config file {path} is a directory; pass a YAML file from configs/") from error
        except yaml.YAMLError as error:
            raise ConfigError(
                f"config file {path} is not valid YAML: {describe_yaml_error(error)}") from error
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(raw, keys, value)
    return config_from_dict(raw)


def model_config(cfg: TrainConfig):
    """Return the ModelConfig of the `model:` section (ModelConfig.from_dict validates it)."""
    from ddn_dist.model import ModelConfig

    try:
        return ModelConfig.from_dict(cfg.model)
    except (TypeError, ValueError, KeyError) as error:
        raise ConfigError(f"section model: {error}") from error
