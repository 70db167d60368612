"""Seeded sampling, latent code files, and the encode/decode commands on a trained digits DDN."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ddn_dist import cli, sampling
from ddn_dist.quality import psnr_by_layers


def read_png(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image).copy()


def test_parse_seeds_ranges_and_lists():
    assert sampling.parse_seeds("0-3,10") == [0, 1, 2, 3, 10]
    assert sampling.parse_seeds("7") == [7]
    assert sampling.parse_seeds("5-5, 2") == [5, 2]


@pytest.mark.parametrize("text", ["", "a-3", "3-1", "-2", "1,,2"])
def test_parse_seeds_rejects_bad_text(text):
    with pytest.raises(ValueError, match="seed"):
        sampling.parse_seeds(text)


def test_codes_for_seeds_per_seed_generator():
    ks = [4, 16, 64]
    codes = sampling.codes_for_seeds(ks, [3, 9, 3])
    generator = torch.Generator().manual_seed(9)
    expected = [int(torch.randint(k, (1,), generator=generator)[0]) for k in ks]
    assert codes[1].tolist() == expected
    assert codes[0].tolist() == codes[2].tolist()
    assert bool((codes < torch.tensor(ks)).all())


def test_sample_batch_invariant(trained_digits):
    model = trained_digits.model
    seeds = list(range(20, 45))
    whole = sampling.sample_seeds(model, seeds, batch_size=25)
    small = sampling.sample_seeds(model, seeds, batch_size=4)
    single = sampling.sample_seeds(model, [seeds[7]], batch_size=1)
    assert torch.equal(whole.codes, small.codes)
    assert torch.allclose(whole.images, small.images, atol=1e-5)
    assert torch.allclose(whole.images[7], single.images[0], atol=1e-5)
    assert np.array_equal(sampling.to_uint8(whole.images), sampling.to_uint8(small.images))
    # Distinct seeds give distinct samples.
    assert len({tuple(row) for row in whole.codes.tolist()}) == len(seeds)


def test_sample_command_deterministic(trained_digits, tmp_path):
    snapshot = trained_digits.snapshot
    first = ["sample", snapshot, "--seeds", "0-8,40", "--device", "cpu"]
    assert cli.main(first + ["--out", str(tmp_path / "a.png"), "--batch-size", "10",
                             "--images-dir", str(tmp_path / "a"), "--codes",
                             str(tmp_path / "a.json")]) == 0
    assert cli.main(first + ["--out", str(tmp_path / "b.png"), "--batch-size", "3",
                             "--images-dir", str(tmp_path / "b")]) == 0

    assert np.array_equal(read_png(tmp_path / "a.png"), read_png(tmp_path / "b.png"))
    for seed in (0, 5, 40):
        name = f"seed{seed:06d}.png"
        assert np.array_equal(read_png(tmp_path / "a" / name), read_png(tmp_path / "b" / name))

    # The grid tiles 10 images of 8x8 in 4 columns with 1-pixel padding.
    grid = read_png(tmp_path / "a.png")
    assert grid.shape == (3 * 9 + 1, 4 * 9 + 1)

    # Each per-image PNG is the decoded latent code of its seed.
    latents = sampling.load_codes(str(tmp_path / "a.json"), list(trained_digits.model.ks))
    assert latents.names[9] == "seed000040"
    decoded = sampling.to_uint8(sampling.decode_codes(trained_digits.model, latents.codes[9:10]))
    assert np.array_equal(decoded[0, :, :, 0], read_png(tmp_path / "a" / "seed000040.png"))


@pytest.mark.parametrize("suffix", [".json", ".npz", ".npy"])
def test_code_file_round_trip(tmp_path, suffix):
    ks = [8, 32, 2]
    codes = sampling.codes_for_seeds(ks, list(range(5)))
    path = str(tmp_path / f"codes{suffix}")
    sampling.save_codes(path, sampling.LatentCodes(codes, ks, [f"n{i}" for i in range(5)]))
    loaded = sampling.load_codes(path, ks)
    assert torch.equal(loaded.codes, codes)
    assert loaded.ks == ks
    assert loaded.bits == pytest.approx(3 + 5 + 1)


def test_code_file_json_fields(tmp_path):
    path = tmp_path / "codes.json"
    codes = torch.tensor([[1, 0], [3, 1]])
    sampling.save_codes(str(path), sampling.LatentCodes(codes, [4, 2]))
    document = json.loads(path.read_text())
    assert document["codes"] == [[1, 0], [3, 1]]
    assert document["ks"] == [4, 2]
    assert document["bits"] == pytest.approx(math.log2(4) + math.log2(2))


def test_load_codes_rejects_other_model(tmp_path):
    path = str(tmp_path / "codes.json")
    sampling.save_codes(path, sampling.LatentCodes(torch.tensor([[3, 1]]), [4, 2]))
    with pytest.raises(ValueError, match="K per layer"):
        sampling.load_codes(path, [4, 4])
    with pytest.raises(ValueError, match="outside"):
        sampling.check_codes(torch.tensor([[4, 1]]), [4, 2])


def save_digits(images: torch.Tensor, directory) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, pixels in enumerate(sampling.to_uint8(images)):
        path = str(directory / f"digit{i:02d}.png")
        sampling.save_png(pixels, path)
        paths.append(path)
    return paths


def test_encode_decode_round_trip(trained_digits, tmp_path, capsys):
    model = trained_digits.model
    originals = trained_digits.images[:6]
    paths = save_digits(originals, tmp_path / "in")
    codes_path = str(tmp_path / "codes.json")
    assert cli.main(["encode", trained_digits.snapshot, str(tmp_path / "in"), "--codes", codes_path,
                     "--recon", str(tmp_path / "recon.png"), "--per-layer", "--device", "cpu"]) == 0
    encode_output = capsys.readouterr().out

    # The code file contains the guided-selection code of every image.
    latents = sampling.load_codes(codes_path, list(model.ks))
    with torch.no_grad():
        expected_codes = model(originals).codes
    assert torch.equal(latents.codes, expected_codes)
    assert latents.names == [f"digit{i:02d}" for i in range(6)]

    # Decoding returns the image that guided selection built while encoding.
    assert cli.main(["decode", trained_digits.snapshot, codes_path, "--images-dir",
                     str(tmp_path / "out"), "--compare", *paths, "--device", "cpu"]) == 0
    decode_output = capsys.readouterr().out
    with torch.no_grad():
        guided_images = model(originals).image
    for i in range(6):
        decoded = read_png(tmp_path / "out" / f"digit{i:02d}.png")
        assert np.array_equal(decoded, sampling.to_uint8(guided_images[i:i + 1])[0, :, :, 0])
    decoded_images = sampling.decode_codes(model, latents.codes)
    assert torch.allclose(decoded_images, guided_images, atol=1e-5)

    # Both commands report the PSNR computed here independently.
    mse = ((decoded_images - originals) / 2).square().flatten(1).mean(1)
    expected_psnr = float((10 * torch.log10(1 / mse)).mean())
    assert f"mean PSNR {expected_psnr:.2f} dB" in encode_output
    assert f"mean PSNR against the originals {expected_psnr:.2f} dB" in decode_output
    assert "     7    35.0  " in encode_output


def test_psnr_grows_with_layers(trained_digits):
    curve = psnr_by_layers(trained_digits.model, trained_digits.images[:200])
    assert len(curve) == trained_digits.model.num_layers
    assert curve[-1] > curve[0] + 5
    # Each scale's layers add detail: the last layer of each resolution beats the previous scale.
    assert curve[2] > curve[0]
    assert curve[4] > curve[2]
    assert curve[6] > curve[4]


def test_psnr_by_layers_last_matches_decode(trained_digits):
    model = trained_digits.model
    images = trained_digits.images[:32]
    curve = psnr_by_layers(model, images)
    decoded = sampling.decode_codes(model, model.encode(images))
    mse = ((decoded - images) / 2).square().flatten(1).mean(1)
    assert curve[-1] == pytest.approx(float((-10 * torch.log10(mse)).mean()), abs=1e-3)


def test_decode_rejects_wrong_code_file(trained_digits, tmp_path, capsys):
    path = str(tmp_path / "other.json")
    sampling.save_codes(path, sampling.LatentCodes(torch.zeros(1, 3, dtype=torch.long), [4, 4, 4]))
    status = cli.main(["decode", trained_digits.snapshot, path, "--out", str(tmp_path / "x.png"),
                       "--device", "cpu"])
    assert status == 1
    assert "K per layer" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_missing_snapshot_error(tmp_path, capsys):
    missing = tmp_path / "none.safetensors"
    status = cli.main(["sample", str(missing), "--out", str(tmp_path / "g.png"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 1
    assert f"snapshot {missing} not found" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_sample_two_processes_match_one(trained_digits, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(port),
        "-m", "ddn_dist.cli", "sample", trained_digits.snapshot, "--seeds", "3-13",
        "--codes", str(tmp_path / "codes.json"), "--out", str(tmp_path / "two.png"),
        "--device", "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    single = sampling.sample_seeds(trained_digits.model, list(range(3, 14)))
    latents = sampling.load_codes(str(tmp_path / "codes.json"), list(trained_digits.model.ks))
    assert torch.equal(latents.codes, single.codes)
    assert np.array_equal(read_png(tmp_path / "two.png"),
                          sampling.make_grid(single.images)[:, :, 0])
