"""The image sets data prep reads, and the image processing applied before encoding.

Four inputs, each listed in a fixed, sorted order so that reruns see the same sequence:

- `FolderSource`: a folder of PNG/JPEG/WebP files searched recursively (the FFHQ layout
  `images1024x1024/00000/00000.png`), sorted by relative path.
- `ZipSource`: a zip in the EDM/StyleGAN `dataset_tool` layout, members sorted by name, labels from
  `dataset.json` (`{"labels": [["00000/img00000000.png", 6], ...]}` or `{"labels": null}`).
- `Cifar10Source`: the CIFAR-10 python tarball (`cifar-10-python.tar.gz`), batches in file order.
- `DigitsSource`: the 8x8 grayscale digits bundled with scikit-learn (1,797 images, 10 classes).

Folders accept the same `dataset.json` at their root. Sources open files lazily in each process,
so worker processes never share a file offset.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import tarfile
import zipfile
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
LABELS_FILE = "dataset.json"
RESAMPLING_FILTER = "centre crop to a square, then PIL Image.LANCZOS resampling"
COLOR_CHOICES = ("auto", "rgb", "gray")
CIFAR_SPLITS = ("train", "test", "all")


class SourceError(ValueError):
    """The input image set is missing, malformed or inconsistent."""


class BadImageError(SourceError):
    """One image is unreadable, truncated or of the wrong size or colour."""


@dataclass(frozen=True)
class ImageFormat:
    """Output image format: side length in pixels, PIL mode (`L` or `RGB`) and conversion rules.

    `resize` is set when a target resolution was requested (centre crop + LANCZOS for every image).
    `convert_color` is set when the colour mode was requested, not taken from the first image.
    """

    resolution: int
    mode: str
    resize: bool = False
    convert_color: bool = False

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3


class ImageSource(ABC):
    """An ordered, indexable image set with optional integer class labels."""

    kind: str = ""

    def __init__(self, name: str):
        self.name = name

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def read(self, i: int) -> Image.Image:
        """Read image `i`; raise BadImageError naming it when it cannot be decoded."""

    def label(self, i: int) -> int | None:
        """Return the class of image `i`, or None when the set is unlabelled."""
        return None

    def describe(self, i: int) -> str:
        """Return a readable name of image `i` for messages (its file name when it has one)."""
        return f"{self.kind} image {i}"

    @property
    def num_classes(self) -> int:
        """Number of classes (max label + 1), 0 when unlabelled."""
        return 0


def _decode(data: bytes, description: str) -> Image.Image:
    """Decode image bytes fully (so truncation shows now) and apply the EXIF orientation."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise BadImageError(f"cannot decode {description}: {error}") from error


def _read_labels(text: str, where: str) -> dict[str, int] | None:
    """Parse `dataset.json`; return {relative file name: class} or None when it has no labels."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as error:
        raise SourceError(f"{where} is not valid JSON: {error}") from error
    labels = raw.get("labels") if isinstance(raw, dict) else None
    if labels is None:
        return None
    try:
        return {str(name).replace("\\", "/"): int(cls) for name, cls in labels}
    except (TypeError, ValueError) as error:
        raise SourceError(
            f'{where}: "labels" must be a list of [file name, class] pairs ({error})'
        ) from error


class _LabelledFiles(ImageSource):
    """Shared label handling of the folder and zip sources."""

    def _init_labels(self, names: list[str], labels: dict[str, int] | None, where: str) -> None:
        self.names = names
        self.labels: list[int] | None = None
        if labels is None:
            return
        missing = [name for name in names if name not in labels]
        if missing:
            raise SourceError(
                f"{where} has no label for {len(missing)} image(s), first {missing[0]!r}; "
                f"add them or remove the labels file"
            )
        self.labels = [labels[name] for name in names]
        if min(self.labels, default=0) < 0:
            raise SourceError(f"{where} contains a negative class; classes must be 0, 1, 2, ...")

    def __len__(self) -> int:
        return len(self.names)

    def label(self, i: int) -> int | None:
        return None if self.labels is None else self.labels[i]

    @property
    def num_classes(self) -> int:
        return 0 if self.labels is None else max(self.labels, default=-1) + 1


class FolderSource(_LabelledFiles):
    """Image files under a folder, recursively, sorted by relative path."""

    kind = "folder"

    def __init__(self, root: str, name: str | None = None):
        if not os.path.isdir(root):
            raise SourceError(f"input folder {root} does not exist or is not a folder")
        super().__init__(name or os.path.basename(os.path.normpath(root)))
        self.root = root
        names = []
        for directory, _, files in os.walk(root):
            for file_name in files:
                if file_name.lower().endswith(IMAGE_EXTENSIONS):
                    names.append(os.path.relpath(os.path.join(directory, file_name), root))
        names = sorted(name.replace(os.sep, "/") for name in names)
        if not names:
            raise SourceError(f"no {'/'.join(IMAGE_EXTENSIONS)} files found under {root}")
        labels_path = os.path.join(root, LABELS_FILE)
        labels = None
        if os.path.exists(labels_path):
            with open(labels_path, encoding="utf-8") as f:
                labels = _read_labels(f.read(), labels_path)
        self._init_labels(names, labels, labels_path)

    def read(self, i: int) -> Image.Image:
        path = os.path.join(self.root, self.names[i])
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as error:
            raise BadImageError(f"cannot read {path}: {error}") from error
        return _decode(data, path)

    def describe(self, i: int) -> str:
        return os.path.join(self.root, self.names[i])


class ZipSource(_LabelledFiles):
    """Images inside a zip in the `dataset_tool` layout, members sorted by name."""

    kind = "zip"

    def __init__(self, path: str, name: str | None = None):
        if not os.path.isfile(path):
            raise SourceError(f"input zip {path} does not exist or is not a file")
        super().__init__(name or os.path.splitext(os.path.basename(path))[0])
        self.path = path
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid = -1
        try:
            archive = self._archive()
        except zipfile.BadZipFile as error:
            raise SourceError(f"{path} is not a valid zip file: {error}") from error
        members = set(archive.namelist())
        names = sorted(n for n in members if n.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            raise SourceError(f"zip {path} contains no {'/'.join(IMAGE_EXTENSIONS)} files")
        labels = None
        if LABELS_FILE in members:
            labels = _read_labels(
                archive.read(LABELS_FILE).decode("utf-8"), f"{path}:{LABELS_FILE}"
            )
        self._init_labels(names, labels, f"{path}:{LABELS_FILE}")

    def _archive(self) -> zipfile.ZipFile:
        # One handle per process: a file offset shared across fork() would corrupt reads.
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zip

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zip": None, "_zip_pid": -1}

    def read(self, i: int) -> Image.Image:
        description = self.describe(i)
        try:
            data = self._archive().read(self.names[i])
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise BadImageError(f"cannot read {description}: {error}") from error
        return _decode(data, description)

    def describe(self, i: int) -> str:
        return f"{self.path}:{self.names[i]}"


class _ArraySource(ImageSource):
    """Images held in memory as a uint8 array (N, H, W) or (N, H, W, 3) with labels (N,)."""

    def __init__(self, name: str, images: np.ndarray, labels: np.ndarray):
        super().__init__(name)
        self.images = images
        self.labels = labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def read(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])

    def label(self, i: int) -> int | None:
        return int(self.labels[i])

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0


class Cifar10Source(_ArraySource):
    """The CIFAR-10 python tarball: 32x32 RGB images, 10 classes, train and/or test batches."""

    kind = "cifar10"
    PREFIX = "cifar-10-batches-py/"

    def __init__(self, path: str, split: str = "train", name: str | None = None):
        if split not in CIFAR_SPLITS:
            raise SourceError(
                f"invalid CIFAR-10 split {split!r}; choose one of {', '.join(CIFAR_SPLITS)}"
            )
        if not os.path.isfile(path):
            raise SourceError(
                f"CIFAR-10 tarball {path} does not exist or is not a file; "
                f"download cifar-10-python.tar.gz"
            )
        batches = {
            "train": [f"data_batch_{n}" for n in range(1, 6)],
            "test": ["test_batch"],
        }
        batch_names = batches["train"] + batches["test"] if split == "all" else batches[split]
        images, labels = [], []
        try:
            with tarfile.open(path, "r:*") as archive:
                for batch in batch_names:
                    member = self.PREFIX + batch
                    try:
                        handle = archive.extractfile(member)
                    except KeyError:
                        handle = None
                    if handle is None:
                        raise SourceError(
                            f"{path} is not the CIFAR-10 python tarball: member {member} is missing"
                        )
                    raw = pickle.load(handle, encoding="bytes")
                    data = np.asarray(raw[b"data"], dtype=np.uint8)
                    # Rows are 3072 bytes: the red, green and blue 32x32 planes in turn.
                    images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                    labels.append(np.asarray(raw[b"labels"], dtype=np.int64))
        except (tarfile.TarError, EOFError, pickle.UnpicklingError, KeyError, OSError) as error:
            # tarfile lists the failure of each compression method on its own line; join them.
            reason = " ".join(str(error).split())
            raise SourceError(f"cannot read CIFAR-10 tarball {path}: {reason}") from error
        super().__init__(name or f"cifar10-{split}", np.concatenate(images), np.concatenate(labels))
        self.path = path


class DigitsSource(_ArraySource):
    """The scikit-learn 8x8 digits (1,797 grayscale images, 10 classes), scaled to 0..255."""

    kind = "digits"

    def __init__(self, name: str | None = None):
        values, labels = _load_digits_table()
        # Pixel values are integers 0..16; round(v * 255 / 16) maps them onto the full uint8 range.
        images = np.rint(values.reshape(-1, 8, 8) * (255.0 / 16.0)).astype(np.uint8)
        super().__init__(name or "digits", images, labels)


def _load_digits_table() -> tuple[np.ndarray, np.ndarray]:
    """Return the digits pixels (1797, 64) and classes (1797,) as shipped with scikit-learn.

    The CSV file is read directly when present, because importing sklearn.datasets takes seconds.
    `load_digits` reads the same file, so the values are identical.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = os.path.join(location, "datasets", "data", "digits.csv.gz")
        if os.path.exists(path):
            table = np.loadtxt(path, delimiter=",")
            return table[:, :-1], table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.data, digits.target


def open_source(
    kind: str, path: str | None = None, split: str = "train", name: str | None = None
) -> ImageSource:
    """Open the input of the given kind (`folder`, `zip`, `cifar10`, `digits`)."""
    if kind == "folder":
        return FolderSource(path, name)
    if kind == "zip":
        return ZipSource(path, name)
    if kind == "cifar10":
        return Cifar10Source(path, split, name)
    if kind == "digits":
        return DigitsSource(name)
    raise SourceError(f"unknown input kind {kind!r}; choose folder, zip, cifar10 or digits")


def _target_mode(image: Image.Image, color: str) -> str:
    if color == "rgb":
        return "RGB"
    if color == "gray":
        return "L"
    return "L" if image.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"


def resolve_format(
    source: ImageSource, order: list[int], resolution: int | None, color: str
) -> ImageFormat:
    """Fix the output format from the options, or from the first readable image in `order`."""
    if color not in COLOR_CHOICES:
        raise SourceError(
            f"invalid colour option {color!r}; choose one of {', '.join(COLOR_CHOICES)}"
        )
    if resolution is not None and resolution < 1:
        raise SourceError(f"invalid resolution {resolution}; pass a positive side length in pixels")
    if resolution is not None and Image.MAX_IMAGE_PIXELS and resolution**2 > Image.MAX_IMAGE_PIXELS:
        # Every worker would allocate the full-size resized image before it fails or is killed.
        raise SourceError(f"invalid resolution {resolution}; it exceeds PIL's limit of "
                          f"{Image.MAX_IMAGE_PIXELS:,} pixels per image (Image.MAX_IMAGE_PIXELS)")
    for i in order:
        try:
            first = source.read(i)
        except BadImageError:
            continue
        if resolution is None and first.width != first.height:
            raise SourceError(
                f"{source.describe(i)} is {first.width}x{first.height}, not square; pass "
                f"--resolution to centre-crop and resize every image"
            )
        return ImageFormat(
            resolution=resolution or first.width,
            mode=_target_mode(first, color),
            resize=resolution is not None,
            convert_color=color != "auto",
        )
    raise SourceError(f"none of the {len(order)} input images of {source.name} could be read")


def process_image(image: Image.Image, fmt: ImageFormat, description: str) -> np.ndarray:
    """Convert one image to `fmt` and return uint8 (H, W) for mode L or (H, W, 3) for RGB.

    With `fmt.resize`, the image is centre-cropped to a square and resampled with LANCZOS to the
    target side. Without it, an image of another size raises BadImageError. A colour image in a
    data set whose grayscale mode came from the first image also raises BadImageError.
    """
    if not fmt.resize and (image.width, image.height) != (fmt.resolution, fmt.resolution):
        raise BadImageError(
            f"{description} is {image.width}x{image.height} but the data set is "
            f"{fmt.resolution}x{fmt.resolution}; pass --resolution to resize mixed sizes"
        )
    converted = image
    if image.mode != fmt.mode:
        if not fmt.convert_color and fmt.mode == "L" and _target_mode(image, "auto") != "L":
            raise BadImageError(
                f"{description} is colour ({image.mode}) but the data set is grayscale; "
                f"pass --color rgb or --color gray"
            )
        # An alpha channel is dropped: PIL's convert keeps the colour under transparent pixels.
        converted = image.convert(fmt.mode)
    if fmt.resize:
        side = min(converted.width, converted.height)
        left = (converted.width - side) // 2
        top = (converted.height - side) // 2
        converted = converted.crop((left, top, left + side, top + side))
        if side != fmt.resolution:
            converted = converted.resize((fmt.resolution, fmt.resolution), Image.LANCZOS)
    return np.asarray(converted, dtype=np.uint8)
