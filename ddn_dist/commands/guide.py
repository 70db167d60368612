"""`ddn guide`: zero-shot conditional generation by changing only the selection rule.

Examples:
    ddn guide SNAPSHOT --task sr --input low_res.png --num 8 --top-k 2 --out sr.png
    ddn guide SNAPSHOT --task inpaint --input digit.png --mask mask.png --degrade --out inpaint.png
    ddn guide SNAPSHOT --task sr:1 --task colorize:0.5 --input face.png --degrade --out both.png
    ddn guide SNAPSHOT --task clip --plugin my_scorers.py --input prompt.png --out clip.png

`--input` is the observation of the task (the low-resolution image for sr, a grayscale image for
colorize, the image whose unknown pixels are ignored for inpaint, the noisy image for denoise, the
quantised image for lowbit). With `--degrade` it is a clean full-size image instead, and each task's
observation is made from it (`--scale`, `--bits`, `--noise-std`, `--mask`).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import math
import os

import torch

from ddn_dist import guidance, sampling

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    """Add the `guide` subcommand."""
    parser = subparsers.add_parser(
        "guide", help="zero-shot conditional generation (sr, colorize, inpaint, denoise, lowbit)",
        description="Generate images that satisfy a condition by scoring each layer's K candidates "
        "against it; several tasks combine by weighted ranks.")
    parser.add_argument("snapshot", help="inference snapshot (.safetensors)")
    parser.add_argument("--task", action="append", required=True, metavar="NAME[:WEIGHT]",
                        help="guidance task (sr, colorize, inpaint, denoise, lowbit or a "
                        "registered one), with an optional rank weight; repeat to combine tasks")
    parser.add_argument("--input", nargs="+", required=True, help="observation image(s)")
    parser.add_argument("--mask", default=None,
                        help="inpainting mask PNG of the image size: white (>= 128) = known pixel")
    parser.add_argument("--degrade", action="store_true",
                        help="treat --input as clean images and make each task's observation")
    parser.add_argument("--scale", type=int, default=2, help="sr downsampling factor for --degrade")
    parser.add_argument("--bits", type=int, default=2, help="bits per channel of the lowbit task")
    parser.add_argument("--noise-std", type=float, default=0.3,
                        help="noise standard deviation (pixel range [-1, 1]) for --degrade denoise")
    parser.add_argument("--num", type=int, default=8, help="samples per input image")
    parser.add_argument("--top-k", type=int, default=2,
                        help="choose at random among the best TOP_K candidates per layer "
                        "(1 = always the best)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the top-k random choice")
    parser.add_argument("--out", required=True,
                        help="grid PNG: per input, the observation then the samples")
    parser.add_argument("--images-dir", default=None, help="directory for one PNG per sample")
    parser.add_argument("--plugin", action="append", default=[],
                        help="Python module name or .py file to import first; it registers scorers "
                        "with ddn_dist.guidance.register_scorer")
    parser.add_argument("--scale-png", type=int, default=1,
                        help="enlarge the grid PNG this many times")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint for s3:// snapshots")
    parser.set_defaults(func=run)


def import_plugin(name: str) -> None:
    """Import a module by name or a .py file by path, so that it can register scorers."""
    if name.endswith(".py"):
        if not os.path.exists(name):
            raise FileNotFoundError(f"scorer plugin file {name} not found")
        module_name = os.path.splitext(os.path.basename(name))[0]
        spec = importlib.util.spec_from_file_location(module_name, name)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name.split(".")[0] and error.name != name:
                raise  # the plugin itself imports a missing module: show where
            raise ValueError(f"scorer plugin module {name!r} not found; pass an importable module "
                             f"name or the path of a .py file") from error


def parse_task(text: str) -> tuple[str, float]:
    """Split "name[:weight]" into the task name and its rank weight (1 by default)."""
    name, _, weight = text.partition(":")
    if not weight:
        return name, 1.0
    try:
        value = float(weight)
    except ValueError:
        value = math.nan
    if not value > 0 or math.isinf(value):
        raise ValueError(
            f"invalid task weight in {text!r}; write NAME:WEIGHT with a positive weight such as sr:0.5"
        )
    return name, value


def load_mask(path: str, resolution: int) -> torch.Tensor:
    """Read a mask PNG as a (1, 1, H, W) float tensor, 1 where the pixel is known."""
    gray = sampling.load_image(path, 1, resolution)  # (1, H, W) in [-1, 1]
    return (gray >= 0).float()[None]


def build_conditions(args: argparse.Namespace, model, tasks: list[tuple[str, float]]):
    """Return the per-task conditions (one row per input image) and the clean images if degraded."""
    config = model.config
    resolution = None if not args.degrade and tasks[0][0] == "sr" else config.resolution
    inputs = torch.stack([sampling.load_image(path, config.image_channels, resolution)
                          for path in args.input])
    mask = load_mask(args.mask, config.resolution) if args.mask else None
    settings = guidance.Degradation(scale=args.scale, bits=args.bits, noise_std=args.noise_std,
                                    seed=args.seed)
    conditions = {}
    for name, _ in tasks:
        if args.degrade:
            conditions[name] = guidance.degrade(name, inputs, mask, settings)
        else:
            conditions[name] = guidance.GuideCondition(inputs, mask=mask, bits=args.bits)
    return conditions, (inputs if args.degrade else None)


def run(args: argparse.Namespace) -> int:
    """Generate guided samples, write the grid, and print each task's condition error."""
    for option, value in (("--num", args.num), ("--bits", args.bits), ("--scale", args.scale),
                          ("--scale-png", args.scale_png)):
        if value < 1:
            raise ValueError(f"invalid {option} {value}; pass 1 or more")
    if not args.noise_std >= 0:
        raise ValueError(f"invalid --noise-std {args.noise_std}; pass 0 or more")
    for plugin in args.plugin:
        import_plugin(plugin)
    tasks = [parse_task(text) for text in args.task]
    device = sampling.resolve_device(args.device)
    model, _ = sampling.load_model(args.snapshot, device, args.endpoint_url)
    conditions, clean = build_conditions(args, model, tasks)

    # Every input image gets `num` rows of the batch: (N * num, C, h, w) conditions.
    repeated = {name: _repeat(condition, args.num) for name, condition in conditions.items()}
    scorers = [(guidance.build_scorer(name, repeated[name]), weight) for name, weight in tasks]
    generator = torch.Generator().manual_seed(args.seed)
    selector = guidance.GuidedSelector(scorers, top_k=args.top_k, generator=generator)
    batch = len(args.input) * args.num
    samples = guidance.guided_generate(model, selector, batch)

    unguided = sampling.sample_seeds(model, list(range(args.seed, args.seed + batch))).images
    for (name, _), (scorer, _) in zip(tasks, scorers):
        guided_error = condition_error(scorer, samples, model.num_layers)
        random_error = condition_error(scorer, unguided, model.num_layers)
        print(f"{name}: condition error {guided_error:.4f} guided vs {random_error:.4f} unguided")

    _write_outputs(args, model, conditions[tasks[0][0]].image, clean, samples)
    return 0


def condition_error(scorer: guidance.Scorer, images: torch.Tensor, num_layers: int) -> float:
    """Return the mean score of final images (B, C, H, W), each scored as a single candidate."""
    with torch.no_grad():
        return float(scorer.score(images[:, None], num_layers - 1).mean())


def _repeat(condition: guidance.GuideCondition, num: int) -> guidance.GuideCondition:
    mask = None if condition.mask is None else condition.mask.expand(
        condition.image.shape[0], -1, -1, -1).repeat_interleave(num, 0)
    return guidance.GuideCondition(condition.image.repeat_interleave(num, 0), mask, condition.bits,
                                   dict(condition.options))


def _write_outputs(args, model, observation: torch.Tensor, clean: torch.Tensor | None,
                   samples: torch.Tensor) -> None:
    size = (model.config.resolution, model.config.resolution)
    shown = guidance.resize(observation.float(), size)
    if shown.shape[1] != samples.shape[1]:
        shown = shown.expand(-1, samples.shape[1], -1, -1)
    rows = []
    for i in range(len(args.input)):
        row = [shown[i:i + 1]]
        if clean is not None:
            row.append(clean[i:i + 1])
        row.append(samples[i * args.num:(i + 1) * args.num])
        rows.append(torch.cat(row))
    columns = args.num + (2 if clean is not None else 1)
    sampling.save_grid(torch.cat(rows), args.out, columns=columns, scale=args.scale_png)
    print(f"wrote {args.out}: per row the observation"
          f"{', the clean image' if clean is not None else ''} and {args.num} samples")
    if args.images_dir:
        for index, pixels in enumerate(sampling.to_uint8(samples)):
            name = f"input{index // args.num:03d}_sample{index % args.num:03d}.png"
            sampling.save_png(pixels, os.path.join(args.images_dir, name))
