"""`ddn prep`: turn an image set into WebDataset tar shards plus index.json at a local or S3 URL.

    ddn prep digits --out s3://bucket/digits --endpoint-url http://127.0.0.1:7480
    ddn prep folder ffhq/images1024x1024 --resolution 64 --out s3://bucket/ffhq64 --workers 8
    ddn prep zip cifar10-32x32.zip --out /data/cifar10
    ddn prep cifar10 cifar-10-python.tar.gz --split train --out /data/cifar10-train
    ddn prep folder ... --part 3/16        # one task of an array job; then:
    ddn prep merge-index s3://bucket/ffhq64
    ddn prep verify s3://bucket/ffhq64

Credentials come from the environment or the AWS configuration (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_PROFILE); the endpoint from --endpoint-url or AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import argparse
import logging

from ddn_dist.data.prep.sources import CIFAR_SPLITS, COLOR_CHOICES, RESAMPLING_FILTER

log = logging.getLogger(__name__)

_BYTE_SUFFIXES = {"k": 1024, "m": 1024**2, "g": 1024**3}


def parse_part(text: str) -> tuple[int, int]:
    """Parse `I/N` (part I of N, 0-based) for argparse."""
    part, _, total = text.partition("/")
    if not (part.isdigit() and total.isdigit()) or not 0 <= int(part) < int(total):
        raise argparse.ArgumentTypeError(
            f"invalid part {text!r}; expected I/N with 0 <= I < N, e.g. 3/16"
        )
    return int(part), int(total)


def parse_bytes(text: str) -> int:
    """Parse a byte count with an optional binary suffix K, M or G (e.g. 512M)."""
    scale = _BYTE_SUFFIXES.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale != 1 else text
    if not digits.isdigit() or int(digits) == 0:
        raise argparse.ArgumentTypeError(
            f"invalid byte count {text!r}; expected e.g. 1073741824 or 1G"
        )
    return int(digits) * scale


def _add_storage_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--endpoint-url",
        default=None,
        help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL)",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _add_build_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", required=True, help="output directory: a path, file:// URL or s3://bucket/prefix"
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help=f"output side in pixels: {RESAMPLING_FILTER} (default: keep the input "
        f"size, which must then be square and the same for every image)",
    )
    parser.add_argument(
        "--color",
        choices=COLOR_CHOICES,
        default="auto",
        help="output colour: rgb, gray, or auto to follow the first image (default)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="shuffle the input order with this seed before --max-images "
        "(default: sorted input order)",
    )
    parser.add_argument(
        "--max-images", type=int, default=None, help="keep at most this many images"
    )
    parser.add_argument(
        "--shard-samples", type=int, default=1000, help="images per shard at most (default 1000)"
    )
    parser.add_argument(
        "--shard-bytes",
        type=parse_bytes,
        default=None,
        help="tar bytes per shard at most, suffix K/M/G allowed (default: no limit)",
    )
    parser.add_argument(
        "--name", default=None, help="data set name in the index (default: from the input)"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes on this machine (default 1)"
    )
    parser.add_argument(
        "--part",
        type=parse_part,
        default=(0, 1),
        metavar="I/N",
        help="prepare only part I of N (0-based) for an array job; join the parts "
        "with `ddn prep merge-index` (default 0/1: everything, index included)",
    )
    parser.add_argument(
        "--on-error",
        choices=("stop", "skip"),
        default="stop",
        help="unreadable or truncated image: stop (default) or skip it and count it",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a different data set already at --out"
    )
    _add_storage_options(parser)


def register(subparsers) -> None:
    """Add `ddn prep` and its subcommands."""
    prep = subparsers.add_parser(
        "prep",
        help="make WebDataset shards and index.json from an image set",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inputs = prep.add_subparsers(dest="prep_command", metavar="INPUT")

    folder = inputs.add_parser(
        "folder", help="a folder of PNG/JPEG/WebP images, searched recursively"
    )
    folder.add_argument("input", help="folder path (optional dataset.json with labels at its root)")
    zip_parser = inputs.add_parser("zip", help="a zip in the EDM/StyleGAN dataset_tool layout")
    zip_parser.add_argument("input", help="zip path (labels from dataset.json inside when present)")
    cifar = inputs.add_parser(
        "cifar10", help="the CIFAR-10 python tarball (cifar-10-python.tar.gz)"
    )
    cifar.add_argument("input", help="path of cifar-10-python.tar.gz")
    cifar.add_argument(
        "--split",
        choices=CIFAR_SPLITS,
        default="train",
        help="train (50,000 images), test (10,000) or all (default train)",
    )
    digits = inputs.add_parser(
        "digits", help="the 8x8 digits bundled with scikit-learn (1,797 images)"
    )
    for kind, parser in (
        ("folder", folder),
        ("zip", zip_parser),
        ("cifar10", cifar),
        ("digits", digits),
    ):
        _add_build_options(parser)
        parser.set_defaults(func=run_build, prep_kind=kind)

    merge = inputs.add_parser(
        "merge-index", help="join the part manifests of an array job into index.json"
    )
    merge.add_argument("out", help="the --out location the parts wrote to")
    _add_storage_options(merge)
    merge.set_defaults(func=run_merge)

    verify = inputs.add_parser("verify", help="re-read every shard and check it against index.json")
    verify.add_argument("location", help="data set directory URL or path (or its index.json)")
    verify.add_argument(
        "--decode", action="store_true", help="also decode every PNG and check its size"
    )
    _add_storage_options(verify)
    verify.set_defaults(func=run_verify)

    prep.set_defaults(func=lambda args: prep.print_help() or 2)


def _errors():
    """Return the exception types reported as a one-line error (exit status 1)."""
    from ddn_dist.data.index import IndexError_
    from ddn_dist.data.prep.jobs import PrepError
    from ddn_dist.data.prep.sources import SourceError
    from ddn_dist.storage import MissingCredentialsError

    return (PrepError, SourceError, IndexError_, MissingCredentialsError)


def run_build(args) -> int:
    """Run one prep job (or one part of it) from parsed arguments."""
    from ddn_dist.data.prep.jobs import PrepOptions, run_prep

    part, num_parts = args.part
    options = PrepOptions(
        kind=args.prep_kind,
        out=args.out,
        input_path=getattr(args, "input", None),
        split=getattr(args, "split", "train"),
        resolution=args.resolution,
        color=args.color,
        seed=args.seed,
        max_images=args.max_images,
        shard_samples=args.shard_samples,
        shard_bytes=args.shard_bytes,
        name=args.name,
        endpoint_url=args.endpoint_url,
        workers=args.workers,
        part=part,
        num_parts=num_parts,
        on_error=args.on_error,
        overwrite=args.overwrite,
        progress=False if args.no_progress else None,
    )
    try:
        run_prep(options)
    except _errors() as error:
        log.error("prep failed: %s", error)
        return 1
    return 0


def run_merge(args) -> int:
    """Write index.json from the part manifests at `args.out`."""
    from ddn_dist.data.prep.jobs import merge_index

    try:
        merge_index(args.out, args.endpoint_url)
    except _errors() as error:
        log.error("merge-index failed: %s", error)
        return 1
    return 0


def run_verify(args) -> int:
    """Verify every shard of a data set; exit status 1 names the failing shards."""
    from ddn_dist.data.prep.verify import verify_dataset

    try:
        report = verify_dataset(
            args.location,
            args.endpoint_url,
            decode_images=args.decode,
            progress=False if args.no_progress else None,
        )
    except _errors() as error:
        log.error("verify failed: %s", error)
        return 1
    if not report.ok:
        log.error(
            "verify failed: %d of %d shards are bad: %s",
            len(report.failures),
            report.shards_total,
            "; ".join(report.failures),
        )
        return 1
    log.info(
        "verify ok: %s, %d shards, %d samples, %d bytes",
        report.index_url,
        report.shards_checked,
        report.samples_checked,
        report.bytes_checked,
    )
    return 0
