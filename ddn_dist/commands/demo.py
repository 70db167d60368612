"""`ddn demo`: the quick start, end to end on real data on this machine's CPUs.

    ddn demo                                     # shards in demo_out/digits, run in demo_out/run
    ddn demo --data s3://bucket/digits --endpoint-url http://127.0.0.1:7480
    ddn demo --kimg 50 --nproc 2 train.lr=0.002  # trailing key=value go to the trainer

Steps: shard the 8x8 digits that ship with scikit-learn into WebDataset shards (skipped when the
location already contains them), train with torchrun on `--nproc` CPU ranks with DeepSpeed ZeRO-2 from
those shards, then load the inference snapshot, write a sample grid and a reconstruction grid, and
print images/s, the final loss, where the files are and the digits quality figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time

log = logging.getLogger("ddn_dist.demo")

REPO_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_CONFIG = os.path.join(REPO_DIR, "configs", "digits.yaml")


def register(subparsers) -> None:
    """Add `ddn demo`."""
    parser = subparsers.add_parser("demo", help="quick start: shard digits, train on 2 CPU ranks, evaluate")
    parser.add_argument("--out", default="demo_out", help="folder for shards, run and grids (default demo_out)")
    parser.add_argument("--data", default=None,
                        help="shard location: path or s3://bucket/prefix (default OUT/digits)")
    parser.add_argument("--endpoint-url", default=None,
                        help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL)")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="training config (default configs/digits.yaml)")
    parser.add_argument("--nproc", type=int, default=2, help="CPU ranks for torchrun (default 2)")
    parser.add_argument("--kimg", type=float, default=None,
                        help="training length in thousands of images (default: the config's)")
    parser.add_argument("--num-samples", type=int, default=2000,
                        help="samples drawn for the quality figures (default 2000)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="extra trainer config overrides")
    parser.set_defaults(func=run)


def ensure_shards(data: str, endpoint_url: str | None) -> None:
    """Shard the digits set to `data` unless a complete data set is already there."""
    from ddn_dist.data import index as index_mod
    from ddn_dist.data.prep.jobs import PrepOptions, run_prep

    try:
        existing = index_mod.load_index(data, endpoint_url)
        log.info("using the %d digits already sharded at %s", existing.num_samples, data)
        return
    except index_mod.IndexError_:
        pass
    log.info("sharding the scikit-learn digits to %s", data)
    run_prep(PrepOptions(kind="digits", out=data, endpoint_url=endpoint_url))


def train(args: argparse.Namespace, data: str, run_dir: str) -> float:
    """Run the trainer through launchers/cpu_2rank.sh; return the wall time in seconds."""
    launcher = os.path.join(REPO_DIR, "launchers", "cpu_2rank.sh")
    if not os.path.exists(launcher):
        raise SystemExit(f"{launcher} not found: `ddn demo` runs from a checkout of ddn-dist "
                         f"(git clone, then bash scripts/quickstart.sh)")
    command = ["bash", launcher, "--config", args.config, "--data", data, "--run-dir", run_dir,
               "--nproc-per-node", str(args.nproc), "deepspeed.stage=2"]
    if args.endpoint_url:
        command.append(f"data.endpoint_url={args.endpoint_url}")
    if args.kimg is not None:
        command.append(f"train.duration_kimg={args.kimg}")
    command += args.overrides
    env = {**os.environ, "PYTHON": sys.executable}
    log.info("training: %s", " ".join(command))
    started = time.monotonic()
    result = subprocess.run(command, env=env, cwd=REPO_DIR, check=False)
    if result.returncode != 0:
        raise SystemExit(f"training failed with exit status {result.returncode}; the log above names the "
                         f"failing rank. Rerun the same command to resume from the last checkpoint.")
    return time.monotonic() - started


def _parameter_shapes(config) -> dict[str, tuple[int, ...]]:
    """Return the shape of every tensor in the state dict of the model `config` builds."""
    import torch

    from ddn_dist.model import build_model

    with torch.device("meta"):  # shapes only, no memory
        return {name: tuple(value.shape) for name, value in build_model(config).state_dict().items()}


def check_run_dir_model(args: argparse.Namespace, run_dir: str) -> None:
    """Reject a run directory whose checkpoints belong to a model of another shape.

    The demo resumes from the run's last checkpoint, which only loads into a model with the same
    parameter shapes. An earlier demo with, say, another K would otherwise fail inside DeepSpeed.
    Options that leave the shapes alone (chain dropout, selection) resume as the trainer allows.
    """
    import yaml

    from ddn_dist.config import load_config, model_config
    from ddn_dist.model import ModelConfig

    saved_path = os.path.join(run_dir, "config.yaml")
    if not (os.path.exists(saved_path) and os.path.isdir(os.path.join(run_dir, "checkpoints"))):
        return
    try:
        with open(saved_path) as f:
            document = yaml.safe_load(f)
        previous = ModelConfig.from_dict(document["model"])
    except (OSError, yaml.YAMLError, TypeError, KeyError, ValueError) as error:
        log.warning("failed to read the model section of %s (%s: %s); the trainer checks the "
                    "checkpoint instead", saved_path, type(error).__name__, error)
        return
    model_overrides = [item for item in args.overrides if item.startswith("model.")]
    requested = model_config(load_config(args.config, model_overrides))
    if _parameter_shapes(previous) == _parameter_shapes(requested):
        return
    old, new = previous.to_dict(), requested.to_dict()
    details = ", ".join(f"model.{key} {old[key]!r} -> {new[key]!r}" for key in sorted(old)
                        if old[key] != new[key])
    raise SystemExit(
        f"{run_dir} contains checkpoints of a model of another shape ({details}), which cannot "
        f"be resumed with this one. Delete {run_dir} or pass another --out folder"
    )


def last_stats(run_dir: str) -> dict:
    """Return the last complete record of `<run_dir>/stats.jsonl` ({} when there is none)."""
    path = os.path.join(run_dir, "stats.jsonl")
    record: dict = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    break
    return record


def write_grids(model, out: str) -> tuple[str, str]:
    """Write a 64-sample grid and a grid of held-out digits over their reconstructions."""
    import torch

    from ddn_dist.quality import _to_model_format, train_digits_classifier
    from ddn_dist.sampling import sample_seeds, save_grid

    samples_path = os.path.join(out, "samples.png")
    save_grid(sample_seeds(model, list(range(64))).images, samples_path, columns=8, scale=4)

    held_out = train_digits_classifier(0).held_out_images[:32]
    originals = _to_model_format(model, torch.from_numpy(held_out))
    with torch.no_grad():
        rebuilt = model.decode(model.encode(originals))
    rows = []
    for start in range(0, 32, 8):
        rows += [originals[start:start + 8], rebuilt[start:start + 8]]
    reconstructions_path = os.path.join(out, "reconstructions.png")
    save_grid(torch.cat(rows), reconstructions_path, columns=8, scale=4)
    return samples_path, reconstructions_path


def run(args: argparse.Namespace) -> int:
    """Shard, train, evaluate and print the summary; return 0 once training has succeeded.

    The quality verdict is printed, not turned into the exit status, because a run that trained
    and wrote its files has done its job. `ddn eval digits SNAPSHOT` exits 1 when the targets fail.
    """
    from ddn_dist.quality import digits_quality
    from ddn_dist.sampling import load_model

    os.makedirs(args.out, exist_ok=True)
    data = args.data or os.path.join(args.out, "digits")
    run_dir = os.path.join(args.out, "run")
    check_run_dir_model(args, run_dir)
    ensure_shards(data, args.endpoint_url)
    seconds = train(args, data, run_dir)

    snapshot = os.path.join(run_dir, "snapshot-latest.safetensors")
    model, _ = load_model(snapshot)
    samples_path, reconstructions_path = write_grids(model, args.out)
    log.info("measuring sample quality on %d samples", args.num_samples)
    quality = digits_quality(model, num_samples=args.num_samples)
    stats = last_stats(run_dir)

    print()
    print("=== ddn demo summary ===")
    print(f"training:        {stats.get('kimg', float('nan')):.1f} kimg in {seconds:.0f} s on "
          f"{args.nproc} CPU ranks (ZeRO-2), last tick {stats.get('images_per_second', float('nan')):.0f} images/s")
    print(f"final loss:      {stats.get('loss', float('nan')):.4f} (mean per-layer MSE)")
    print(f"shards:          {data}")
    print(f"run directory:   {run_dir} (checkpoints, stats.jsonl, sample grids per snapshot)")
    print(f"snapshot:        {snapshot}")
    print(f"sample grid:     {samples_path}")
    print(f"reconstructions: {reconstructions_path} (rows: held-out digits, then their reconstructions)")
    print(quality.summary())
    return 0
