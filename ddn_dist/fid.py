"""Frechet Inception Distance: features, statistics, the distance, and the distributed pipeline.

The feature network is loaded from a file or URL that the user provides, never downloaded
implicitly:
- a `.pth` state dict of the pytorch-fid network, `pt_inception-2015-12-05-6726825d.pth` from
  the pytorch-fid release `fid_weights` (PYTORCH_FID_URL below).
  Images go in as uint8, then [0, 1], are resized to 299x299 bilinearly and scaled to [-1, 1]
  (the standard protocol), and the 2048-d pool3 features come out.
- NVIDIA's detector `inception-2015-12-05.pkl` used by StyleGAN3 and EDM (STYLEGAN3_URL below),
  or the same network as a `.pt` file. It takes uint8 (B, 3, H, W) images and resizes them
  itself, and it is called with `return_features=True`.
Grayscale images are repeated to three channels. Statistics are accumulated as sums in float64, so
ranks reduce them with one all-reduce instead of gathering every feature vector.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import zipfile
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F

from ddn_dist import storage

log = logging.getLogger(__name__)

PYTORCH_FID_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
STYLEGAN3_URL = ("https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/"
                 "metrics/inception-2015-12-05.pkl")
WEIGHTS_HELP = (
    f"download the pytorch-fid weights from {PYTORCH_FID_URL} or the StyleGAN3/EDM detector from "
    f"{STYLEGAN3_URL} on a machine with internet access and pass the local path (or a URL this "
    f"machine can reach) with --inception"
)
STATS_FORMAT = "ddn-fid-stats"


class InceptionWeightsError(FileNotFoundError):
    """The Inception weights file is missing, unreachable or not one of the supported formats."""


class FeatureExtractor:
    """Maps (B, C, H, W) images in [-1, 1] to (B, D) float64 features with a loaded network.

    `kind` is "state_dict" for the pytorch-fid layout, or "torchscript" for an NVIDIA-style
    detector that takes uint8 images and resizes them itself. `name` identifies the weights (file
    name and SHA-256 prefix) in statistics files.
    """

    def __init__(self, network: torch.nn.Module, kind: str, name: str,
                 device: torch.device | str = "cpu"):
        self.network = network.to(device).eval()
        self.kind = kind
        self.name = name
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        pixels = ((images.float() + 1) * 127.5).round().clamp(0, 255)
        if pixels.shape[1] == 1:
            pixels = pixels.repeat(1, 3, 1, 1)
        pixels = pixels.to(self.device)
        if self.kind == "torchscript":
            features = self.network(pixels.to(torch.uint8), return_features=True)
        else:
            scaled = F.interpolate(pixels / 255, size=(299, 299), mode="bilinear",
                                   align_corners=False)
            features = self.network(scaled * 2 - 1)
        return features.reshape(features.shape[0], -1).double().cpu()


def _read_weights(path_or_url: str) -> bytes:
    if "://" in path_or_url and not path_or_url.startswith("file://"):
        try:
            return storage.read_bytes(path_or_url)
        except Exception as error:  # noqa: BLE001 - any fetch failure gets the same advice
            raise InceptionWeightsError(
                f"could not fetch the Inception weights from {path_or_url} ({error}); "
                f"{WEIGHTS_HELP}"
            ) from error
    path = path_or_url.removeprefix("file://")
    if not os.path.exists(path):
        raise InceptionWeightsError(f"Inception weights file {path} not found; {WEIGHTS_HELP}")
    with open(path, "rb") as f:
        return f.read()


def _is_torchscript(data: bytes) -> bool:
    """Tell a TorchScript archive (it has constants.pkl) from a torch.save zip of a state dict."""
    if data[:2] != b"PK":
        return False
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def load_feature_extractor(
    path_or_url: str, device: torch.device | str = "cpu"
) -> FeatureExtractor:
    """Load the FID feature network from a local file or URL (.pth, .pkl or .pt).

    A zip archive with constants.pkl is loaded as TorchScript. Another zip, or a `.pth` name, is
    read as a state dict of the pytorch-fid network. Anything else is unpickled as an NVIDIA
    detector, which runs code from the file, so pass only a file from a source you trust.

    NOTE: NVIDIA's released detector files were not available here; their loading was checked only
    with small networks of the same calling convention (pickled and TorchScript).
    """
    data = _read_weights(path_or_url)
    base = os.path.basename(path_or_url.split("?")[0])
    name = f"{base}:{hashlib.sha256(data).hexdigest()[:12]}"
    if _is_torchscript(data):
        network = torch.jit.load(io.BytesIO(data), map_location="cpu")
        return FeatureExtractor(network, "torchscript", name, device)
    if data[:2] != b"PK" and not base.endswith(".pth"):
        # NVIDIA's detector files (.pkl, and the older .pt) are plain pickles of the network.
        try:
            network = pickle.loads(data)
        except Exception as error:  # noqa: BLE001 - any unpickling failure means a wrong or damaged file
            raise InceptionWeightsError(
                f"{path_or_url} is not a readable Inception weights file ({error!r}); {WEIGHTS_HELP}"
            ) from error
        return FeatureExtractor(network, "torchscript", name, device)
    from ddn_dist.inception import InceptionV3Features

    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - reported with the supported formats
        raise InceptionWeightsError(
            f"{path_or_url} is not a readable Inception weights file ({error}); {WEIGHTS_HELP}"
        ) from error
    # The classifier head and the batch counters play no part in the pool3 features.
    state = {
        key: value for key, value in state.items()
        if not key.startswith(("fc.", "AuxLogits.")) and not key.endswith("num_batches_tracked")
    }
    network = InceptionV3Features()
    result = network.load_state_dict(state, strict=False)
    missing = [key for key in result.missing_keys if not key.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise InceptionWeightsError(
            f"{path_or_url} does not match the pytorch-fid Inception-v3 layout (missing "
            f"{missing[:3]}, unexpected {result.unexpected_keys[:3]}); {WEIGHTS_HELP}"
        )
    return FeatureExtractor(network, "state_dict", name, device)


@dataclass
class FeatureStats:
    """Running sums of features: count, sum (D,) and sum of outer products (D, D), all float64."""

    count: int
    total: np.ndarray
    outer: np.ndarray
    extractor: str = ""

    @classmethod
    def empty(cls, dims: int, extractor: str = "") -> "FeatureStats":
        """Create statistics of zero features of `dims` dimensions."""
        return cls(0, np.zeros(dims), np.zeros((dims, dims)), extractor)

    def add(self, features: torch.Tensor | np.ndarray) -> None:
        """Add (N, D) features."""
        features = np.asarray(features, dtype=np.float64)
        self.count += features.shape[0]
        self.total += features.sum(axis=0)
        self.outer += features.T @ features

    def mean(self) -> np.ndarray:
        """Mean feature vector (D,)."""
        return self.total / self.count

    def covariance(self) -> np.ndarray:
        """Unbiased covariance (D, D), as numpy.cov computes it."""
        if self.count < 2:
            raise ValueError(f"covariance needs at least 2 images, got {self.count}")
        mu = self.mean()
        return (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)

    def save(self, path: str) -> None:
        """Write mean, covariance, count and extractor name as an .npz file, atomically."""
        buffer = io.BytesIO()
        np.savez(buffer, format=STATS_FORMAT, mu=self.mean(), sigma=self.covariance(),
                 count=self.count, extractor=self.extractor)
        storage.write_bytes_atomic(path, buffer.getvalue())


@dataclass
class GaussianStats:
    """Mean (D,) and covariance (D, D) of a feature set, with the count and extractor name."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    extractor: str


def load_stats(path: str) -> GaussianStats:
    """Read statistics written by `ddn eval ref` (or any .npz with `mu` and `sigma`)."""
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"reference statistics {path} not found; compute them with "
            f"`ddn eval ref SHARDS --out {path}`"
        ) from error
    try:
        arrays = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile) as error:  # not .npy/.npz, or a damaged .npz
        raise ValueError(f"{path} is not an FID statistics .npz file; compute one with "
                         f"`ddn eval ref SHARDS --out {path}`") from error
    with arrays:
        if "mu" not in arrays or "sigma" not in arrays:
            raise ValueError(
                f"{path} has no 'mu' and 'sigma' arrays, so it is not an FID statistics file"
            )
        count = int(arrays["count"]) if "count" in arrays else 0
        extractor = str(arrays["extractor"]) if "extractor" in arrays else ""
        return GaussianStats(arrays["mu"], arrays["sigma"], count, extractor)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Return ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)).

    When the product is so singular that sqrtm returns non-finite values, `eps` is added to both
    diagonals. A tiny imaginary part from rounding is dropped, but a large one raises ValueError.
    Rounding below zero returns 0.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"feature sizes differ: {mu1.shape} vs {mu2.shape}; use one extractor for both"
        )
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        log.warning("sqrtm of the covariance product is singular; adding %g to the diagonals", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"sqrtm has an imaginary part of {np.abs(covmean.imag).max():.3g}; the statistics "
                f"are degenerate (too few images for the feature size?)"
            )
        covmean = covmean.real
    distance = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
    # The distance is a squared norm; a negative value is rounding error of identical statistics.
    return max(distance, 0.0)


def reduce_stats(stats: FeatureStats, accelerator=None) -> FeatureStats:
    """Sum statistics over all processes of `accelerator` (a no-op for one process or None)."""
    if accelerator is None or accelerator.num_processes == 1:
        return stats
    packed = torch.from_numpy(np.concatenate([[float(stats.count)], stats.total,
                                              stats.outer.ravel()])).to(accelerator.device)
    packed = accelerator.reduce(packed, reduction="sum").cpu().numpy()
    dims = stats.total.shape[0]
    return FeatureStats(int(round(packed[0])), packed[1:dims + 1].copy(),
                        packed[dims + 1:].reshape(dims, dims).copy(), stats.extractor)


def _feature_dims(extractor: FeatureExtractor, channels: int) -> int:
    probe = torch.zeros(1, channels, 8, 8)
    return int(extractor(probe).shape[1])


def generated_stats(model, extractor: FeatureExtractor, num: int, batch_size: int = 64,
                    first_seed: int = 0, accelerator=None) -> FeatureStats:
    """Feature statistics of `num` samples with seeds first_seed .. first_seed + num - 1.

    With an accelerate `Accelerator` of several processes, each process generates its share of the
    seeds and the sums are all-reduced, so the result does not depend on the number of processes.
    """
    from ddn_dist.sampling import sample_seeds

    seeds = list(range(first_seed, first_seed + num))
    if accelerator is not None and accelerator.num_processes > 1:
        with accelerator.split_between_processes(seeds) as own:
            seeds = list(own)
    channels = int(model.config.image_channels)
    stats = FeatureStats.empty(_feature_dims(extractor, channels), extractor.name)
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start:start + batch_size]
        stats.add(extractor(sample_seeds(model, chunk, batch_size).images))
        log.debug("features of %d/%d generated images", start + len(chunk), len(seeds))
    return reduce_stats(stats, accelerator)


def iter_shard_images(location: str, shard_numbers: list[int], endpoint_url: str | None = None):
    """Yield (key, (C, H, W) float32 image in [-1, 1]) for every sample of the listed shards."""
    import tarfile

    from PIL import Image

    from ddn_dist.data.index import index_url_for, load_index, shard_url

    index = load_index(location, endpoint_url)
    index_url = index_url_for(location)
    mode = "L" if index.dataset.channels == 1 else "RGB"
    for number in shard_numbers:
        url = shard_url(index_url, index.shards[number])
        data = storage.read_bytes(url, endpoint_url)
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
            for member in archive:
                if not member.name.endswith(".png"):
                    continue
                with Image.open(archive.extractfile(member)) as image:
                    pixels = np.asarray(image.convert(mode), dtype=np.float32)
                if pixels.ndim == 2:
                    pixels = pixels[:, :, None]
                key = member.name[: -len(".png")]
                yield key, torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1


def reference_stats(location: str, extractor: FeatureExtractor, batch_size: int = 64,
                    endpoint_url: str | None = None, accelerator=None) -> FeatureStats:
    """Feature statistics of every image of a shard set; processes split the shards round-robin."""
    from ddn_dist.data.index import load_index

    index = load_index(location, endpoint_url)
    shard_numbers = list(range(len(index.shards)))
    if accelerator is not None and accelerator.num_processes > 1:
        shard_numbers = shard_numbers[accelerator.process_index::accelerator.num_processes]
    stats = FeatureStats.empty(_feature_dims(extractor, index.dataset.channels), extractor.name)
    batch: list[torch.Tensor] = []
    for _, image in iter_shard_images(location, shard_numbers, endpoint_url):
        batch.append(image)
        if len(batch) == batch_size:
            stats.add(extractor(torch.stack(batch)))
            batch = []
    if batch:
        stats.add(extractor(torch.stack(batch)))
    return reduce_stats(stats, accelerator)


def fid_against(stats: FeatureStats, reference: GaussianStats) -> float:
    """Return the FID of statistics against reference ones, warning on an extractor mismatch."""
    if reference.extractor and stats.extractor and reference.extractor != stats.extractor:
        log.warning("reference statistics were computed with %s but the features with %s; "
                    "the FID is not comparable", reference.extractor, stats.extractor)
    return frechet_distance(stats.mean(), stats.covariance(), reference.mu, reference.sigma)
