"""`ddn sample`: seeded samples from a snapshot as a grid, per-image PNGs and latent codes.

Examples:
    ddn sample runs/digits/snapshot-latest.safetensors --seeds 0-63 --out grid.png
    ddn sample SNAPSHOT --seeds 0-999 --images-dir samples/ --codes samples/codes.json
    accelerate launch --num_processes 2 -m ddn_dist.cli sample SNAPSHOT --seeds 0-9999 \
        --images-dir samples/
"""

from __future__ import annotations

import argparse
import logging
import os

from ddn_dist import sampling

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    """Add the `sample` subcommand."""
    parser = subparsers.add_parser(
        "sample",
        help="generate seeded samples from a snapshot",
        description="Generate one sample per seed. A seed always gives the same image, at any "
        "batch size and number of processes (start several with accelerate launch or torchrun).",
    )
    parser.add_argument("snapshot",
                        help="inference snapshot (.safetensors, local path or s3:// URL)")
    parser.add_argument("--seeds", default="0-63",
                        help="seeds as a list of integers and inclusive ranges, e.g. 0-63,100")
    parser.add_argument("--out", default=None, help="grid PNG to write (e.g. grid.png)")
    parser.add_argument("--images-dir", default=None,
                        help="directory for one PNG per seed, named seed<NNNNNN>.png")
    parser.add_argument("--codes", default=None,
                        help="latent code file to write (.json, .npz or .npy)")
    parser.add_argument("--batch-size", type=int, default=64, help="images decoded per batch")
    parser.add_argument("--columns", type=int, default=None,
                        help="images per grid row (default: square grid)")
    parser.add_argument("--scale", type=int, default=1,
                        help="enlarge the grid PNG this many times (nearest neighbour)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint for s3:// snapshots")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Generate the samples and write the requested outputs; return the exit status."""
    seeds = sampling.parse_seeds(args.seeds)
    if args.out is None and args.images_dir is None and args.codes is None:
        log.error("nothing to write; pass --out GRID.png, --images-dir DIR or --codes FILE")
        return 2
    accelerator = sampling.make_accelerator(args.device)
    model, _ = sampling.load_model(args.snapshot, accelerator.device, args.endpoint_url)
    log.info("sampling %d seeds from %s (%d layers, %.1f-bit codes) on %d process(es)",
             len(seeds), args.snapshot, model.num_layers, model.latent_bits,
             accelerator.num_processes)
    result = sampling.sample_distributed(model, seeds, args.batch_size, accelerator)
    if not accelerator.is_main_process:
        return 0

    if args.out:
        sampling.save_grid(result.images, args.out, args.columns, args.scale)
        log.info("wrote the %d-image grid %s", len(seeds), args.out)
    if args.images_dir:
        pixels = sampling.to_uint8(result.images)
        for seed, image in zip(result.seeds, pixels):
            sampling.save_png(image, os.path.join(args.images_dir, f"seed{seed:06d}.png"))
        log.info("wrote %d images to %s", len(seeds), args.images_dir)
    if args.codes:
        names = [f"seed{seed:06d}" for seed in result.seeds]
        sampling.save_codes(args.codes, sampling.LatentCodes(result.codes, list(model.ks), names))
        log.info("wrote the latent codes (%.1f bits each) to %s", model.latent_bits, args.codes)
    return 0
