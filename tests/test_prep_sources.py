"""Data prep inputs on local disk (folder, zip, CIFAR-10 tarball, digits) and image processing."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from ddn_dist.data.index import load_index
from ddn_dist.data.prep.jobs import PrepError, PrepOptions, run_prep
from ddn_dist.data.prep.sources import FolderSource
from tests.fixtures.data import make_dataset_zip


def read_samples(location):
    """Return {key: (uint8 pixels, class or None)} read back from every shard with tarfile."""
    index = load_index(location)
    samples = {}
    for shard in index.shards:
        with tarfile.open(os.path.join(location, shard.url)) as archive:
            members = {m.name: archive.extractfile(m).read() for m in archive.getmembers()}
        for entry in shard.samples:
            pixels = np.asarray(Image.open(io.BytesIO(members[f"{entry.key}.png"])))
            label = members.get(f"{entry.key}.cls")
            samples[entry.key] = (pixels, None if label is None else int(label))
    return samples


def prep(tmp_path, kind, input_path=None, **kwargs):
    out = str(tmp_path / "out")
    run_prep(PrepOptions(kind=kind, out=out, input_path=input_path, progress=False, **kwargs))
    return out


def test_cifar_train_pixels_and_labels(tmp_path, tiny_cifar):
    path, train_images, train_labels, _, _ = tiny_cifar
    out = prep(tmp_path, "cifar10", path, shard_samples=7)
    samples = read_samples(out)
    index = load_index(out)
    assert index.dataset.num_samples == 20
    assert index.dataset.channels == 3
    assert index.dataset.resolution == 32
    assert [s.num_samples for s in index.shards] == [7, 7, 6]
    for i in range(20):
        pixels, label = samples[f"{i:06d}"]
        np.testing.assert_array_equal(pixels, train_images[i])
        assert label == train_labels[i]
    flat = train_images.reshape(-1, 3).astype(np.float64) / 255
    np.testing.assert_allclose(index.dataset.mean, flat.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(index.dataset.std, flat.std(axis=0), rtol=1e-10)


def test_cifar_test_and_all_splits(tmp_path, tiny_cifar):
    path, _, _, test_images, test_labels = tiny_cifar
    test_out = prep(tmp_path / "test", "cifar10", path, split="test")
    samples = read_samples(test_out)
    assert len(samples) == 4
    np.testing.assert_array_equal(samples["000003"][0], test_images[3])
    assert samples["000003"][1] == test_labels[3]
    all_out = prep(tmp_path / "all", "cifar10", path, split="all")
    assert load_index(all_out).dataset.num_samples == 24
    np.testing.assert_array_equal(read_samples(all_out)["000020"][0], test_images[0])


def test_cifar_rejects_other_tarball(tmp_path):
    path = tmp_path / "other.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        archive.addfile(tarfile.TarInfo("readme.txt"), io.BytesIO(b""))
    with pytest.raises(PrepError, match="not the CIFAR-10 python tarball"):
        prep(tmp_path, "cifar10", str(path))


def test_zip_dataset_tool_labels(tmp_path):
    contents = make_dataset_zip(tmp_path / "set.zip", count=12)
    out = prep(tmp_path, "zip", str(tmp_path / "set.zip"), shard_samples=5)
    samples = read_samples(out)
    index = load_index(out)
    assert index.dataset.has_labels
    assert index.dataset.num_classes == max(label for _, label in contents.values()) + 1
    for i, name in enumerate(sorted(contents)):
        pixels, label = samples[f"{i:06d}"]
        np.testing.assert_array_equal(pixels, contents[name][0])
        assert label == contents[name][1]


def test_zip_without_labels(tmp_path):
    make_dataset_zip(tmp_path / "set.zip", count=3, labelled=False)
    out = prep(tmp_path, "zip", str(tmp_path / "set.zip"))
    index = load_index(out)
    assert not index.dataset.has_labels
    assert index.dataset.num_classes == 0
    assert all(label is None for _, label in read_samples(out).values())


def write_image(path, pixels, fmt, **save_options):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt, **save_options)


def test_folder_nested_formats_resized(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "images"
    write_image(
        root / "00000" / "00000.png", rng.integers(0, 256, (40, 60, 3), dtype=np.uint8), "PNG"
    )
    write_image(
        root / "00000" / "00001.jpg", rng.integers(0, 256, (48, 48, 3), dtype=np.uint8), "JPEG"
    )
    write_image(
        root / "01000" / "01000.webp",
        rng.integers(0, 256, (64, 32, 3), dtype=np.uint8),
        "WEBP",
        lossless=True,
    )
    (root / "notes.txt").write_text("not an image")
    out = prep(tmp_path, "folder", str(root), resolution=16)
    samples = read_samples(out)
    assert sorted(samples) == ["000000", "000001", "000002"]
    assert all(pixels.shape == (16, 16, 3) for pixels, _ in samples.values())
    # The 60x40 PNG is centre-cropped to its middle 40x40 square before LANCZOS resampling.
    original = np.asarray(Image.open(root / "00000" / "00000.png"))
    expected = np.asarray(Image.fromarray(original[:, 10:50]).resize((16, 16), Image.LANCZOS))
    np.testing.assert_array_equal(samples["000000"][0], expected)
    assert load_index(out).dataset.options["filter"].endswith("LANCZOS resampling")


def test_folder_order_is_sorted_paths(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "images"
    names = ["b/2.png", "a/10.png", "a/9.png", "c.png"]
    for name in names:
        write_image(root / name, rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "PNG")
    assert FolderSource(str(root)).names == sorted(names)


def test_folder_gray_option_and_labels(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "images"
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    write_image(root / "x" / "a.png", rgb, "PNG")
    write_image(root / "x" / "b.png", rgb[::-1].copy(), "PNG")
    (root / "dataset.json").write_text(json.dumps({"labels": [["x/a.png", 3], ["x/b.png", 1]]}))
    out = prep(tmp_path, "folder", str(root), color="gray")
    samples = read_samples(out)
    assert samples["000000"][0].shape == (8, 8)
    np.testing.assert_array_equal(
        samples["000000"][0], np.asarray(Image.fromarray(rgb).convert("L"))
    )
    assert samples["000000"][1] == 3
    assert samples["000001"][1] == 1
    assert load_index(out).dataset.channels == 1


def test_folder_mixed_sizes_rejected(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "images"
    write_image(root / "a.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "PNG")
    write_image(root / "b.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "PNG")
    with pytest.raises(
        PrepError, match=r"b.png is 16x16 but the data set is 8x8; pass --resolution"
    ):
        prep(tmp_path, "folder", str(root))


def test_folder_non_square_needs_resolution(tmp_path):
    write_image(tmp_path / "images" / "a.png", np.zeros((8, 10, 3), dtype=np.uint8), "PNG")
    with pytest.raises(PrepError, match="not square; pass --resolution"):
        prep(tmp_path, "folder", str(tmp_path / "images"))


def test_folder_colour_after_gray_rejected(tmp_path):
    root = tmp_path / "images"
    write_image(root / "a.png", np.zeros((8, 8), dtype=np.uint8), "PNG")
    write_image(root / "b.png", np.zeros((8, 8, 3), dtype=np.uint8), "PNG")
    with pytest.raises(PrepError, match="pass --color rgb or --color gray"):
        prep(tmp_path, "folder", str(root))


def make_folder_with_bad_images(root):
    rng = np.random.default_rng(5)
    for name in ("a.png", "c.png", "e.png"):
        write_image(root / name, rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), "PNG")
    good = (root / "a.png").read_bytes()
    (root / "b.png").write_bytes(good[: len(good) // 2])  # truncated
    (root / "d.jpg").write_bytes(b"this is not a JPEG file")


def test_bad_images_stop_by_default(tmp_path):
    make_folder_with_bad_images(tmp_path / "images")
    with pytest.raises(PrepError, match=r"b.png.*pass --on-error skip"):
        prep(tmp_path, "folder", str(tmp_path / "images"))
    assert not os.path.exists(tmp_path / "out" / "index.json")


def test_bad_images_skipped_and_counted(tmp_path):
    make_folder_with_bad_images(tmp_path / "images")
    out = prep(tmp_path, "folder", str(tmp_path / "images"), on_error="skip")
    index = load_index(out)
    assert index.dataset.num_samples == 3
    assert index.dataset.options["bad_images_skipped"] == 2
    # Keys are output positions, so the skipped images leave gaps (b.png was 1, d.jpg was 3).
    assert [s.key for s in index.shards[0].samples] == ["000000", "000002", "000004"]


def test_digits_seed_and_max_images(tmp_path):
    from sklearn.datasets import load_digits

    out = prep(tmp_path, "digits", seed=7, max_images=50, shard_samples=20)
    index = load_index(out)
    assert index.dataset.num_samples == 50
    order = np.random.Generator(np.random.PCG64(7)).permutation(1797)[:50]
    digits = load_digits()
    samples = read_samples(out)
    for position in (0, 17, 49):
        source = order[position]
        expected = np.rint(digits.images[source] * 255 / 16).astype(np.uint8)
        np.testing.assert_array_equal(samples[f"{position:06d}"][0], expected)
        assert samples[f"{position:06d}"][1] == digits.target[source]


def test_webdataset_reads_shards(digits_shards):
    index = load_index(digits_shards)
    url = os.path.join(digits_shards, index.shards[-1].url)
    records = list(
        wds.WebDataset(url, shardshuffle=False).decode("l").to_tuple("__key__", "png", "cls")
    )
    assert [key for key, _, _ in records] == [s.key for s in index.shards[-1].samples]
    assert records[0][1].shape == (8, 8)
    assert all(0 <= cls < 10 for _, _, cls in records)
