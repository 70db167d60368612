"""`ddn eval`: FID against reference statistics, reference statistics from shards, digits quality.

Examples:
    ddn eval ref data/ffhq64 --out ffhq64_stats.npz --inception pt_inception-2015-12-05-6726825d.pth
    ddn eval fid SNAPSHOT --ref ffhq64_stats.npz --num 50000 \
        --inception pt_inception-2015-12-05-6726825d.pth
    torchrun --nproc_per_node 8 -m ddn_dist.cli eval fid SNAPSHOT --ref stats.npz \
        --num-images 50000 --inception W.pth
    ddn eval digits runs/digits/snapshot-latest.safetensors --num 1000

FID needs the Inception-v3 weights, which are not shipped and not downloaded automatically: pass
the pytorch-fid `pt_inception-2015-12-05-6726825d.pth` or the StyleGAN3/EDM
`inception-2015-12-05.pkl` as a local file or a URL this machine can reach. Work is split over the
processes of `accelerate launch` or torchrun: seeds for `fid`, shards for `ref`.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

from ddn_dist import fid, sampling

log = logging.getLogger(__name__)
INCEPTION_HELP = (
    "Inception-v3 weights, local path or URL: pytorch-fid pt_inception-2015-12-05-6726825d.pth "
    "or StyleGAN3/EDM inception-2015-12-05.pkl (TorchScript .pt also accepted); this command "
    "never downloads them by itself"
)


def register(subparsers) -> None:
    """Add the `eval` subcommand with its `fid`, `ref` and `digits` subcommands."""
    parser = subparsers.add_parser("eval", help="FID, FID reference statistics, digits quality")
    commands = parser.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND", required=True)

    fid_parser = commands.add_parser(
        "fid", help="FID of generated samples against reference statistics",
        description="FID of NUM samples (seeds SEED .. SEED+NUM-1) against statistics from `ddn "
        "eval ref`. Inception weights: " + fid.WEIGHTS_HELP + ".")
    fid_parser.add_argument("snapshot", help="inference snapshot (.safetensors)")
    fid_parser.add_argument("--ref", required=True,
                            help="reference statistics (.npz from `ddn eval ref`)")
    # --num-images is the same option under a name that launchers (torchrun, accelerate launch)
    # do not take for an abbreviation of one of their own options.
    fid_parser.add_argument("--num", "--num-images", dest="num", type=int, default=50000,
                            help="number of generated images")
    fid_parser.add_argument("--inception", required=True, help=INCEPTION_HELP)
    fid_parser.add_argument("--seed", type=int, default=0, help="first seed")
    fid_parser.add_argument("--save-stats", default=None,
                            help="also write the generated images' statistics (.npz)")
    _add_common(fid_parser)
    fid_parser.set_defaults(func=run_fid)

    ref_parser = commands.add_parser(
        "ref", help="FID reference statistics of a shard set",
        description="Feature mean and covariance of every image of a shard set. "
        + "Inception weights: " + fid.WEIGHTS_HELP + ".")
    ref_parser.add_argument("shards", help="shard set directory or s3:// URL (with index.json)")
    ref_parser.add_argument("--out", required=True, help="statistics file to write (.npz)")
    ref_parser.add_argument("--inception", required=True, help=INCEPTION_HELP)
    _add_common(ref_parser)
    ref_parser.set_defaults(func=run_ref)

    digits_parser = commands.add_parser(
        "digits", help="quality figures of a digits model",
        description="Classifier-confident share of samples vs real held-out digits (target "
        ">= 90 %), per-class shares (target 4 %-25 %), and reconstruction PSNR by layers used.")
    digits_parser.add_argument("snapshot", help="inference snapshot of an 8x8 digits model")
    digits_parser.add_argument("--num", "--num-images", dest="num", type=int, default=2000,
                               help="number of samples")
    digits_parser.add_argument("--seed", type=int, default=0,
                               help="first sample seed and classifier split seed")
    digits_parser.add_argument("--no-psnr", action="store_true",
                               help="skip the reconstruction PSNR")
    digits_parser.add_argument("--json", default=None, help="also write the figures as JSON")
    _add_common(digits_parser)
    digits_parser.set_defaults(func=run_digits)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint for s3:// paths")


def run_fid(args: argparse.Namespace) -> int:
    """Compute and print the FID; return the exit status."""
    reference = fid.load_stats(args.ref)
    accelerator = sampling.make_accelerator(args.device)
    extractor = fid.load_feature_extractor(args.inception, accelerator.device)
    model, _ = sampling.load_model(args.snapshot, accelerator.device, args.endpoint_url)
    start = time.monotonic()
    stats = fid.generated_stats(model, extractor, args.num, args.batch_size, args.seed, accelerator)
    if not accelerator.is_main_process:
        return 0
    value = fid.fid_against(stats, reference)
    if args.save_stats:
        stats.save(args.save_stats)
    last_seed = args.seed + args.num - 1
    print(f"FID {value:.3f} of {stats.count} samples (seeds {args.seed}..{last_seed}) "
          f"against {args.ref} ({reference.count} images), features {extractor.name}, "
          f"{time.monotonic() - start:.1f} s on {accelerator.num_processes} process(es)")
    if stats.count < 2048:
        log.warning("FID from %d images is biased upwards; the standard protocol uses 50,000",
                    stats.count)
    return 0


def run_ref(args: argparse.Namespace) -> int:
    """Compute and write reference statistics of a shard set; return the exit status."""
    accelerator = sampling.make_accelerator(args.device)
    extractor = fid.load_feature_extractor(args.inception, accelerator.device)
    start = time.monotonic()
    stats = fid.reference_stats(args.shards, extractor, args.batch_size, args.endpoint_url,
                                accelerator)
    if accelerator.is_main_process:
        stats.save(args.out)
        print(f"wrote statistics of {stats.count} images of {args.shards} to {args.out} "
              f"(features {extractor.name}, {time.monotonic() - start:.1f} s)")
    return 0


def run_digits(args: argparse.Namespace) -> int:
    """Print the digits quality figures; exit status 0 when the targets are met, 1 otherwise."""
    from ddn_dist.quality import digits_quality

    device = sampling.resolve_device(args.device)
    model, _ = sampling.load_model(args.snapshot, device, args.endpoint_url)
    quality = digits_quality(model, args.num, args.seed, args.batch_size,
                             measure_psnr=not args.no_psnr)
    print(quality.summary())
    if quality.psnr_by_layers:
        curve = " ".join(f"{value:.1f}" for value in quality.psnr_by_layers)
        print(f"reconstruction PSNR (dB) after 1..{len(quality.psnr_by_layers)} layers: {curve}")
    if args.json:
        document = {
            "passed": quality.passed,
            "num_samples": quality.num_samples,
            "sample_confident_share": quality.sample_confident_share,
            "real_confident_share": quality.real_confident_share,
            "share_ratio": quality.share_ratio,
            "class_shares": quality.class_shares,
            "psnr_by_layers": quality.psnr_by_layers,
        }
        with open(args.json, "w") as f:
            json.dump(document, f, indent=2)
    return 0 if quality.passed else 1
