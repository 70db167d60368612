"""The 2D toy experiment: one DDL whose K outputs are free 2D points fitted to a density map.

Each iteration draws a batch from the density, selects for every sample the nearest point
(squared L2), and pulls that point toward the sample with a gradient step of the squared
distance. With Split-and-Prune the points keep equal selection frequencies; without it, points
stranded in empty regions never move. Quality is KL(P || Q) between the 100x100 histogram P of
the K points and the density Q, next to the KL of K real samples drawn from Q.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from ddn_dist.model.ddl import SelectionStats
from ddn_dist.model.split_prune import apply_split_prune, choose_split_prune

GRID = 100  # density maps and histograms are GRID x GRID over [-1, 1]^2
# Added to every density cell before renormalising, so KL(P || Q) stays finite when a point
# lands where the map is empty; such a point then costs about log(1e20 / GRID^2) / K nats.
DENSITY_EPSILON = 1e-20
# Map names and the PNG files shipped in the distribution-playground package.
IMAGE_MAPS = {"spiral": "sprial.png", "qr_code": "QR_code.png", "words": "words.png"}
DENSITY_NAMES = (*IMAGE_MAPS, "blur_circles", "gaussian")


@dataclass
class Toy2DResult:
    """Outcome of one toy run."""

    points: np.ndarray  # (K, 2) fitted points, x right and y up, in [-1, 1]
    kl: float  # KL(P || Q) of the fitted points
    real_kl: float  # KL(P || Q) of K samples drawn from the density
    splits: int  # split+prune events applied


def playground_image_dir() -> Path:
    """Locate the density PNGs without importing distribution_playground (it needs cv2)."""
    spec = importlib.util.find_spec("distribution_playground")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "package distribution-playground is not installed; run `pip install distribution-playground`"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "density_map_imgs"


def _normalise(density: np.ndarray) -> np.ndarray:
    density = density / density.sum()
    density = density + DENSITY_EPSILON / density.size
    return density / density.sum()


def _blur_circles() -> np.ndarray:
    """Five rings, each quadrant but the top-left blurred more strongly."""
    rows, cols = np.mgrid[0:GRID, 0:GRID]
    image = np.zeros((GRID, GRID))
    radius = GRID // 10
    centres = [(GRID // 2, GRID // 2)] + [(r * GRID // 4, c * GRID // 4) for r in (1, 3) for c in (1, 3)]
    for row, col in centres:
        distance = np.hypot(rows - row, cols - col)
        image[(distance <= radius) & (distance > radius / 2)] = 1.0
    half = GRID // 2
    out = image.copy()
    for (r0, c0), sigma in zip([(0, half), (half, 0), (half, half)], [1.0, 3.0, 12.0]):
        blurred = ndimage.gaussian_filter(image, sigma)
        out[r0 : r0 + half, c0 : c0 + half] = blurred[r0 : r0 + half, c0 : c0 + half]
    return out


def load_density(name: str) -> np.ndarray:
    """Return the GRID x GRID density (rows top to bottom) of a named map, summing to 1."""
    if name in IMAGE_MAPS:
        path = playground_image_dir() / IMAGE_MAPS[name]
        image = Image.open(path).convert("RGB").resize((GRID, GRID), Image.Resampling.BOX)
        return _normalise(np.asarray(image, dtype=np.float64).mean(axis=2))
    if name == "blur_circles":
        return _normalise(_blur_circles())
    if name == "gaussian":
        y, x = np.meshgrid(np.linspace(-1, 1, GRID), np.linspace(-1, 1, GRID), indexing="ij")
        return _normalise(np.exp(-(x**2 + y**2) / 0.3))
    raise ValueError(f"unknown density {name!r}; valid names are {list(DENSITY_NAMES)}")


def sample_density(density: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw n points (n, 2) from the density: a cell by its mass, then uniform inside the cell."""
    cells = rng.choice(density.size, size=n, p=density.ravel())
    rows, cols = np.divmod(cells, GRID)
    step = 2.0 / GRID
    x = -1.0 + (cols + rng.random(n)) * step
    y = 1.0 - (rows + rng.random(n)) * step
    return np.stack([x, y], axis=1)


def histogram(points: np.ndarray) -> np.ndarray:
    """Normalised GRID x GRID histogram of points (clipped into [-1, 1]^2)."""
    cols = np.clip(np.floor((points[:, 0] + 1.0) / 2.0 * GRID), 0, GRID - 1).astype(int)
    rows = np.clip(np.floor((1.0 - points[:, 1]) / 2.0 * GRID), 0, GRID - 1).astype(int)
    counts = np.zeros((GRID, GRID))
    np.add.at(counts, (rows, cols), 1.0)
    return counts / counts.sum()


def kl_divergence(points: np.ndarray, density: np.ndarray) -> float:
    """KL(P || Q) in nats between the points' histogram P and the density Q."""
    p = histogram(points).ravel()
    q = density.ravel()
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def fit_points(
    density: np.ndarray,
    k: int = 2000,
    batch: int = 40,
    iterations: int = 1800,
    lr: float = 0.1,
    split_prune: bool = True,
    seed: int = 0,
) -> tuple[np.ndarray, int]:
    """Fit K points to the density; returns the points (K, 2) and the number of split+prunes.

    A selected point p moves by lr times the gradient of ||p - x||^2, i.e. p += 2 lr (x - p),
    summed over the samples that selected it.
    """
    rng = np.random.default_rng(seed)
    points = torch.from_numpy(rng.random((k, 2)) * 2.0 - 1.0)
    stats = SelectionStats(k)
    splits = 0
    for _ in range(iterations):
        samples = torch.from_numpy(sample_density(density, batch, rng))
        distances = torch.cdist(samples, points).square()  # (batch, K)
        winners = distances.argmin(dim=1)
        if split_prune:
            stats.record(distances)
            decision = choose_split_prune(stats.count, stats.loss_acc)
            if decision is not None:
                split, prune = decision
                apply_split_prune(stats, split, prune)
                points[prune] = points[split]
                splits += 1
        # The summed gradient of the batch: a point selected twice gets both pulls.
        points.index_add_(0, winners, 2.0 * lr * (samples - points[winners]))
    return points.numpy(), splits


def run_toy2d(
    name: str,
    k: int = 2000,
    batch: int = 40,
    iterations: int = 1800,
    lr: float = 0.1,
    split_prune: bool = True,
    seed: int = 0,
) -> Toy2DResult:
    """Fit points to a named density and measure both KL values."""
    for label, value in (("k", k), ("batch", batch), ("iterations", iterations)):
        if value < 1:
            raise ValueError(f"--{label}={value} is invalid; use a positive integer")
    if k < 2:
        raise ValueError(f"--k={k} is invalid; Split-and-Prune needs at least 2 points")
    density = load_density(name)
    points, splits = fit_points(density, k, batch, iterations, lr, split_prune, seed)
    real = sample_density(density, k, np.random.default_rng(seed + 1))
    return Toy2DResult(points, kl_divergence(points, density), kl_divergence(real, density), splits)


def plot_points(result: Toy2DResult, density: np.ndarray, path: str, title: str) -> None:
    """Draw the fitted points over the density and save the figure to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 6))
    axis.imshow(density, extent=(-1, 1, -1, 1), cmap="viridis", origin="upper")
    size = max(0.5, 2000.0 / max(len(result.points), 1) * 0.5)
    axis.scatter(result.points[:, 0], result.points[:, 1], s=size, c="red", alpha=0.7, linewidths=0)
    axis.set_xlim(-1, 1)
    axis.set_ylim(-1, 1)
    axis.set_title(f"{title}: kl={result.kl:.3f} real_kl={result.real_kl:.3f}")
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)

