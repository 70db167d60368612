"""`ddn encode` and `ddn decode`: images to latent code files and back, with reconstruction PSNR.

Examples:
    ddn encode SNAPSHOT digit0.png digit1.png --codes codes.json --recon recon.png --per-layer
    ddn decode SNAPSHOT codes.json --out decoded.png --images-dir decoded/

A code is the index chosen at every layer by guided selection (the candidate nearest the image);
it costs sum(log2 K_l) bits. PSNR is over the [0, 1] pixel range.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch

from ddn_dist import sampling
from ddn_dist.quality import layer_images, psnr

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def register(subparsers) -> None:
    """Add the `encode` and `decode` subcommands."""
    encode = subparsers.add_parser(
        "encode", help="encode images to a latent code file",
        description="Encode images by guided selection and report the reconstruction PSNR (dB).")
    encode.add_argument("snapshot", help="inference snapshot (.safetensors)")
    encode.add_argument("images", nargs="+", help="image files, or directories of images")
    encode.add_argument("--codes", required=True,
                        help="latent code file to write (.json, .npz or .npy)")
    encode.add_argument("--recon", default=None, help="grid PNG of the reconstructions")
    encode.add_argument("--per-layer", action="store_true",
                        help="print the mean PSNR after each number of layers (quality vs bits)")
    _add_common(encode)
    encode.set_defaults(func=run_encode)

    decode = subparsers.add_parser(
        "decode", help="decode a latent code file to images",
        description="Decode every code of a latent code file from `ddn encode` or `ddn sample`.")
    decode.add_argument("snapshot", help="inference snapshot (.safetensors) that wrote the codes")
    decode.add_argument("codes", help="latent code file (.json, .npz or .npy)")
    decode.add_argument("--out", default=None, help="grid PNG of the decoded images")
    decode.add_argument("--images-dir", default=None, help="directory for one PNG per code")
    decode.add_argument("--compare", nargs="+", default=None,
                        help="original images, in code order, to report the PSNR against")
    _add_common(decode)
    decode.set_defaults(func=run_decode)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch")
    parser.add_argument("--scale", type=int, default=1, help="enlarge grid PNGs this many times")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint for s3:// snapshots")


def list_images(paths: list[str]) -> list[str]:
    """Expand directories into their image files (sorted by name); keep files as given."""
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, name) for name in os.listdir(path)
                           if name.lower().endswith(IMAGE_SUFFIXES))
            if not found:
                raise FileNotFoundError(
                    f"directory {path} contains no {'/'.join(IMAGE_SUFFIXES)} images"
                )
            files.extend(found)
        else:
            files.append(path)
    return files


def load_images(paths: list[str], model) -> torch.Tensor:
    """Read image files as an (N, C, H, W) batch in [-1, 1] in the model's channels and size."""
    config = model.config
    return torch.stack([sampling.load_image(path, config.image_channels, config.resolution)
                        for path in paths])


def encode_images(model, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Return the (N, L) codes of (N, C, H, W) images by guided selection."""
    device = sampling.model_device(model)
    parts = [model.encode(chunk.to(device)).cpu() for chunk in images.split(batch_size)]
    return torch.cat(parts)


def psnr_curve(model, images: torch.Tensor, codes: torch.Tensor, batch_size: int) -> list[float]:
    """Mean PSNR (dB) of the images rebuilt from the first n layers of `codes`, n = 1 .. L."""
    sums = torch.zeros(model.num_layers, dtype=torch.float64)
    for chunk_images, chunk_codes in zip(images.split(batch_size), codes.split(batch_size)):
        for layer, rebuilt in enumerate(layer_images(model, chunk_codes)):
            sums[layer] += psnr(rebuilt, chunk_images).double().sum()
    return (sums / len(images)).tolist()


def run_encode(args: argparse.Namespace) -> int:
    """Encode the images, write the code file, and print the PSNR; return the exit status."""
    device = sampling.resolve_device(args.device)
    model, _ = sampling.load_model(args.snapshot, device, args.endpoint_url)
    paths = list_images(args.images)
    images = load_images(paths, model)
    codes = encode_images(model, images, args.batch_size)
    names = [os.path.splitext(os.path.basename(path))[0] for path in paths]
    sampling.save_codes(args.codes, sampling.LatentCodes(codes, list(model.ks), names))

    decoded = sampling.decode_codes(model, codes, args.batch_size)
    values = psnr(decoded, images)
    print(f"encoded {len(paths)} image(s) to {args.codes}: {model.latent_bits:.1f} bits each, "
          f"mean PSNR {float(values.mean()):.2f} dB")
    if len(paths) <= 16:
        for name, value in zip(names, values.tolist()):
            print(f"  {name}: {value:.2f} dB")
    if args.recon:
        sampling.save_grid(torch.cat([images, decoded]), args.recon, columns=len(paths),
                           scale=args.scale)
        print(f"wrote originals (top row) and reconstructions (bottom row) to {args.recon}")
    if args.per_layer:
        print("layers  bits    mean PSNR (dB)")
        bits = 0.0
        for layer, value in enumerate(psnr_curve(model, images, codes, args.batch_size)):
            bits += sampling.latent_bits([model.ks[layer]])
            print(f"{layer + 1:6d}  {bits:6.1f}  {value:.2f}")
    return 0


def run_decode(args: argparse.Namespace) -> int:
    """Decode a code file to images and optionally compare them; return the exit status."""
    device = sampling.resolve_device(args.device)
    model, _ = sampling.load_model(args.snapshot, device, args.endpoint_url)
    latents = sampling.load_codes(args.codes, list(model.ks))
    if args.out is None and args.images_dir is None and args.compare is None:
        log.error("nothing to do; pass --out GRID.png, --images-dir DIR or --compare IMAGE...")
        return 2
    images = sampling.decode_codes(model, latents.codes, args.batch_size)
    print(f"decoded {len(images)} code(s) of {latents.bits:.1f} bits from {args.codes}")
    if args.out:
        sampling.save_grid(images, args.out, scale=args.scale)
        print(f"wrote {args.out}")
    if args.images_dir:
        names = latents.names or [f"code{i:06d}" for i in range(len(images))]
        for name, pixels in zip(names, sampling.to_uint8(images)):
            sampling.save_png(pixels, os.path.join(args.images_dir, f"{name}.png"))
        print(f"wrote {len(images)} image(s) to {args.images_dir}")
    if args.compare:
        originals = load_images(list_images(args.compare), model)
        if len(originals) != len(images):
            log.error("--compare lists %d images but the code file has %d codes",
                      len(originals), len(images))
            return 2
        print(f"mean PSNR against the originals {float(psnr(images, originals).mean()):.2f} dB")
    return 0
