"""`ddn info CONFIG`: print the layers, K per layer, latent bits and parameter count of a model."""

from __future__ import annotations

import argparse
import itertools
import logging
from pathlib import Path

import torch
import yaml

from ddn_dist.config import describe_yaml_error
from ddn_dist.model import DDN, ModelConfig, build_model

log = logging.getLogger(__name__)


def load_model_config(path: str) -> ModelConfig:
    """Read the `model:` section of a YAML config file."""
    try:
        document = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise SystemExit(f"config file {path} not found; pass a YAML file such as configs/digits.yaml")
    except IsADirectoryError:
        raise SystemExit(
            f"config file {path} is a directory; pass a YAML file such as configs/digits.yaml")
    except yaml.YAMLError as error:
        raise SystemExit(f"config file {path} is not valid YAML: {describe_yaml_error(error)}")
    if not isinstance(document, dict) or not isinstance(document.get("model"), dict):
        raise SystemExit(f"config file {path} has no `model:` mapping; see configs/digits.yaml")
    return ModelConfig.from_dict(document["model"])


def compress_runs(values: list) -> str:
    """Write a list as runs, e.g. [512]*63 + [256]*64 -> "512 x 63, 256 x 64"."""
    runs = [(value, len(list(group))) for value, group in itertools.groupby(values)]
    return ", ".join(f"{value} x {count}" for value, count in runs)


def count_parameters(model: DDN) -> int:
    """Number of trainable parameter elements."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def describe(cfg: ModelConfig) -> str:
    """Return the text that `ddn info` prints for a config."""
    with torch.device("meta"):  # no memory is allocated for the weights
        model = build_model(cfg)
    groups = compress_runs(model.layer_groups)
    lines = [
        f"architecture: {cfg.architecture}, {cfg.resolution}x{cfg.resolution}, "
        f"{cfg.image_channels} image channel(s)",
        f"layers: {model.num_layers} ({groups})",
        f"K per layer: {compress_runs(model.ks)}",
        f"latent bits: {model.latent_bits:.1f}",
        f"parameters: {count_parameters(model):,}",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Print the description of the config file in `args.config`."""
    try:
        cfg = load_model_config(args.config)
    except ValueError as error:
        log.error("invalid model config in %s: %s", args.config, error)
        return 2
    print(describe(cfg))
    return 0


def register(subparsers) -> None:
    """Add the `info` subcommand."""
    parser = subparsers.add_parser("info", help="print layers, K, latent bits and parameter count")
    parser.add_argument("config", help="YAML config file with a `model:` section")
    parser.set_defaults(func=run)
