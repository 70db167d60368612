"""Seeded sampling from a trained DDN, latent code files, and image grids.

Each seed owns a `torch.Generator` seeded with that seed, which draws one uniform index per layer
(`torch.randint(K_l)`, layer by layer). The codes are then decoded in batches, and decoding a code
does not depend on the other codes in its batch, so the batch size never changes a sample.

Latent code files hold the chosen index of every layer for every image:
- `.json`: {"format": "ddn-latent", "version": 1, "ks": [...], "bits": float, "codes": [[...]],
  "names": [...]} with `bits` = sum(log2 K_l) per image;
- `.npz`: arrays `codes` (N, L), `ks` (L,) and `bits` (scalar);
- `.npy`: the (N, L) int64 code array alone (K per layer then comes from the model).
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ddn_dist import storage

LATENT_FORMAT = "ddn-latent"
LATENT_VERSION = 1
_SEED_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_seeds(text: str) -> list[int]:
    """Parse a seed list such as "0-63,100" (comma-separated inclusive ranges), keeping order."""
    seeds: list[int] = []
    for part in text.split(","):
        part = part.strip()
        match = _SEED_RANGE.match(part)
        if match is None:
            raise ValueError(
                f"invalid seed list {text!r}: {part!r} is not a non-negative integer or a range "
                f"like 0-63; write e.g. --seeds 0-63,100"
            )
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise ValueError(f"invalid seed range {part!r} in {text!r}: the end is below the start")
        seeds.extend(range(first, last + 1))
    return seeds


def latent_bits(ks: list[int]) -> float:
    """Return the size of one latent code in bits, sum(log2 K_l)."""
    return float(sum(math.log2(k) for k in ks))


def codes_for_seeds(ks: list[int], seeds: list[int]) -> torch.Tensor:
    """Draw the (N, L) long code of each seed from its own generator: a uniform index per layer."""
    codes = torch.empty(len(seeds), len(ks), dtype=torch.long)
    for row, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(int(seed))
        for layer, k in enumerate(ks):
            codes[row, layer] = torch.randint(int(k), (1,), generator=generator)[0]
    return codes


def model_device(model: torch.nn.Module) -> torch.device:
    """Return the device of the model's first parameter (CPU for a model without parameters)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def decode_codes(model, codes: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Decode (N, L) codes in batches of `batch_size`; return (N, C, H, W) float32 images on CPU."""
    check_codes(codes, list(model.ks))
    if batch_size < 1:
        raise ValueError(f"invalid batch size {batch_size}; pass a batch size of at least 1")
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        parts = [
            model(codes=chunk.to(device)).image.float().cpu()
            for chunk in codes.split(batch_size)
        ]
    finally:
        model.train(was_training)
    return torch.cat(parts) if parts else torch.empty(0)


@dataclass
class SampleResult:
    """Samples of a seed list: seeds (N,), codes (N, L) long, images (N, C, H, W) in [-1, 1]."""

    seeds: list[int]
    codes: torch.Tensor
    images: torch.Tensor


def sample_seeds(model, seeds: list[int], batch_size: int = 64) -> SampleResult:
    """Generate one sample per seed; a seed gives the same image at any batch size."""
    codes = codes_for_seeds(list(model.ks), seeds)
    images = decode_codes(model, codes, batch_size)
    return SampleResult(seeds=list(seeds), codes=codes, images=images)


def check_codes(codes: torch.Tensor, ks: list[int]) -> None:
    """Raise ValueError unless `codes` is an (N, L) integer tensor with 0 <= code < K per layer."""
    if codes.dim() != 2 or codes.shape[1] != len(ks):
        raise ValueError(
            f"latent codes have shape {tuple(codes.shape)} but the model has {len(ks)} layers; "
            f"use codes written for this snapshot (shape (N, {len(ks)}))"
        )
    if codes.dtype.is_floating_point:
        raise ValueError(f"latent codes must be integers, got dtype {codes.dtype}")
    limits = torch.tensor(ks, dtype=torch.long)
    bad = (codes < 0) | (codes >= limits)
    if bool(bad.any()):
        row, layer = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"latent code {int(codes[row, layer])} of image {row} at layer {layer} is outside "
            f"[0, {ks[layer]}); the code file was written for a model with other K per layer"
        )


@dataclass
class LatentCodes:
    """Contents of a latent code file: codes (N, L) long, K per layer, and optional image names."""

    codes: torch.Tensor
    ks: list[int]
    names: list[str] = field(default_factory=list)

    @property
    def bits(self) -> float:
        """Size of one image's code in bits."""
        return latent_bits(self.ks)


def save_codes(path: str, latents: LatentCodes) -> None:
    """Write a latent code file atomically; the suffix (.json, .npz or .npy) picks the format."""
    check_codes(latents.codes, latents.ks)
    codes = latents.codes.cpu().numpy().astype(np.int64)
    if path.endswith(".json"):
        document = {
            "format": LATENT_FORMAT,
            "version": LATENT_VERSION,
            "ks": [int(k) for k in latents.ks],
            "bits": latents.bits,
            "codes": codes.tolist(),
            "names": list(latents.names),
        }
        data = (json.dumps(document, separators=(",", ":")) + "\n").encode()
    elif path.endswith(".npz") or path.endswith(".npy"):
        import io

        buffer = io.BytesIO()
        if path.endswith(".npz"):
            np.savez(buffer, codes=codes, ks=np.asarray(latents.ks, np.int64),
                     bits=np.float64(latents.bits))
        else:
            np.save(buffer, codes)
        data = buffer.getvalue()
    else:
        raise ValueError(f"unknown latent code file type {path!r}; use a .json, .npz or .npy name")
    storage.write_bytes_atomic(path, data)


def load_codes(path: str, ks: list[int] | None = None) -> LatentCodes:
    """Read a latent code file; `ks` (the model's K per layer) is checked, and needed for `.npy`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"latent code file {path} not found; write one with `ddn encode`")
    if path.endswith(".json"):
        try:
            with open(path) as f:
                document = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"latent code file {path} is not valid JSON ({error})") from error
        file_format = document.get("format") if isinstance(document, dict) else None
        if file_format != LATENT_FORMAT:
            raise ValueError(f"{path} is not a ddn latent code file (format={file_format!r})")
        try:
            ks_in_file = [int(k) for k in document["ks"]]
            codes = torch.tensor(document["codes"], dtype=torch.long).reshape(-1, len(ks_in_file))
        except (KeyError, TypeError, ValueError, RuntimeError) as error:  # missing or mistyped fields
            raise ValueError(f"latent code file {path} is malformed ({error!r}); write it again "
                             f"with `ddn encode` or `ddn sample --codes`") from error
        latents = LatentCodes(codes, ks_in_file, list(document.get("names", [])))
    elif path.endswith(".npz"):
        try:
            with np.load(path) as arrays:
                latents = LatentCodes(torch.from_numpy(arrays["codes"].astype(np.int64)),
                                      [int(k) for k in arrays["ks"]])
        except (KeyError, ValueError, OSError, zipfile.BadZipFile) as error:  # not an npz, or no codes/ks
            raise ValueError(f"latent code file {path} is not an .npz with `codes` and `ks` arrays "
                             f"({error}); write it again with `ddn encode` or `ddn sample --codes`"
                             ) from error
    elif path.endswith(".npy"):
        if ks is None:
            raise ValueError(
                f"{path} contains codes only, so decoding it needs the model's K per layer"
            )
        latents = LatentCodes(torch.from_numpy(np.load(path).astype(np.int64)), list(ks))
    else:
        raise ValueError(f"unknown latent code file type {path!r}; use a .json, .npz or .npy name")
    if ks is not None and list(ks) != latents.ks:
        raise ValueError(
            f"latent code file {path} was written for K per layer {latents.ks} but the model has "
            f"{list(ks)}; decode it with the snapshot that encoded it"
        )
    check_codes(latents.codes, latents.ks)
    return latents


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Convert (N, C, H, W) images in [-1, 1] to (N, H, W, C) uint8, rounding and clamping."""
    scaled = ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255)
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, columns: int | None = None, padding: int = 1) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] into one (rows*H', columns*W', C) uint8 array."""
    pixels = to_uint8(images)
    count, height, width, channels = pixels.shape
    columns = columns or max(1, math.ceil(math.sqrt(count)))
    rows = max(1, math.ceil(count / columns))
    grid = np.zeros((rows * (height + padding) + padding, columns * (width + padding) + padding,
                     channels), np.uint8)
    for i in range(count):
        top = padding + (i // columns) * (height + padding)
        left = padding + (i % columns) * (width + padding)
        grid[top:top + height, left:left + width] = pixels[i]
    return grid


def save_png(pixels: np.ndarray, path: str, scale: int = 1) -> None:
    """Write an (H, W, C) uint8 array as a PNG (mode L for one channel), enlarged `scale` times."""
    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}.png")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def save_grid(images: torch.Tensor, path: str, columns: int | None = None, scale: int = 1) -> None:
    """Write (N, C, H, W) images in [-1, 1] as one grid PNG."""
    save_png(make_grid(images, columns), path, scale)


def load_image(path: str, channels: int, resolution: int | None = None) -> torch.Tensor:
    """Read a PNG/JPEG as a (C, H, W) float32 tensor in [-1, 1], converted to `channels` (1 or 3).

    With `resolution`, an image of another size raises ValueError naming both sizes.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"image {path} not found")
    try:
        opened = Image.open(path)
    except UnidentifiedImageError as error:
        raise ValueError(f"{path} is not an image that PIL can read; pass PNG or JPEG files") from error
    with opened as image:
        image = image.convert("L" if channels == 1 else "RGB")
        pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if resolution is not None and pixels.shape[:2] != (resolution, resolution):
        raise ValueError(
            f"image {path} is {pixels.shape[1]}x{pixels.shape[0]} pixels but the model makes "
            f"{resolution}x{resolution} images; resize it first"
        )
    return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1


def resolve_device(name: str | None) -> torch.device:
    """Return the requested device, or CUDA when available and CPU otherwise for None/"auto"."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"invalid --device {name!r}; pass cpu, cuda, cuda:N or auto") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {name!r} was requested but CUDA is not available; pass --device cpu"
        )
    return device


def make_accelerator(device: str | None = None):
    """Create an accelerate `Accelerator`: one process unless started by accelerate or torchrun."""
    from accelerate import Accelerator

    return Accelerator(cpu=resolve_device(device).type == "cpu")


def load_model(snapshot: str, device: torch.device | str = "cpu", endpoint_url: str | None = None):
    """Load an inference snapshot onto `device` in eval mode; return (model, meta)."""
    from ddn_dist.snapshot import load_snapshot

    if "://" not in snapshot and not os.path.exists(snapshot):
        raise FileNotFoundError(
            f"snapshot {snapshot} not found; training writes one (snapshot-latest.safetensors in the run "
            f"directory)"
        )
    model, meta = load_snapshot(snapshot, device=device, endpoint_url=endpoint_url)
    return model.eval(), meta


def sample_distributed(model, seeds: list[int], batch_size: int, accelerator=None) -> SampleResult:
    """Run `sample_seeds` with the seeds split over the processes, gathering results on all."""
    if accelerator is None or accelerator.num_processes == 1:
        return sample_seeds(model, seeds, batch_size)
    from accelerate.utils import gather_object

    with accelerator.split_between_processes(list(seeds)) as own:
        part = sample_seeds(model, list(own), batch_size)
    parts = gather_object([(part.seeds, part.codes, part.images)])
    return SampleResult(
        seeds=[seed for part_seeds, _, _ in parts for seed in part_seeds],
        codes=torch.cat([codes for _, codes, _ in parts]),
        images=torch.cat([images for _, _, images in parts]),
    )
