"""FID: Frechet distance on known Gaussians, statistics, feature loading, the eval commands."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddn_dist import cli, fid, sampling
from ddn_dist.quality import digits_images


class TinyDetector(torch.nn.Module):
    """A small stand-in for the Inception detector with its TorchScript calling convention."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.proj = torch.nn.Linear(16 * 4 * 4, 24)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = x.to(torch.float32) / 127.5 - 1
        x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        x = torch.tanh(self.conv(x))
        return self.proj(F.adaptive_avg_pool2d(x, 4).flatten(1))


@pytest.fixture(scope="module")
def tiny_detector(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("detector") / "tiny-detector.pt")
    torch.jit.script(TinyDetector()).save(path)
    return path


def random_rotation(dims: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(dims, dims)))
    return q


def test_frechet_commuting_closed_form():
    rng = np.random.default_rng(1)
    dims = 6
    rotation = random_rotation(dims, 2)
    a, b = rng.uniform(0.2, 3.0, dims), rng.uniform(0.2, 3.0, dims)
    mu1, mu2 = rng.normal(size=dims), rng.normal(size=dims)
    sigma1 = rotation @ np.diag(a) @ rotation.T
    sigma2 = rotation @ np.diag(b) @ rotation.T
    # Commuting covariances: tr sqrt(S1 S2) = sum sqrt(a_i b_i).
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)


def test_frechet_general_matches_eigenvalues():
    rng = np.random.default_rng(3)
    dims = 8
    x, y = rng.normal(size=(dims, dims)), rng.normal(size=(dims, dims))
    sigma1, sigma2 = x @ x.T + 0.1 * np.eye(dims), y @ y.T + 0.1 * np.eye(dims)
    mu1, mu2 = rng.normal(size=dims), rng.normal(size=dims)
    # S1 S2 is similar to a positive definite matrix: tr sqrt(S1 S2) = sum sqrt(eigenvalues).
    trace_sqrt = np.sum(np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).real))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)
    assert fid.frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="feature sizes differ"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats_match_numpy(tmp_path):
    features = np.random.default_rng(5).normal(size=(257, 7)) * 3 + 1
    stats = fid.FeatureStats.empty(7)
    for chunk in np.array_split(features, 5):
        stats.add(torch.from_numpy(chunk))
    assert stats.count == 257
    assert np.allclose(stats.mean(), features.mean(axis=0))
    assert np.allclose(stats.covariance(), np.cov(features, rowvar=False))

    stats.save(str(tmp_path / "stats.npz"))
    loaded = fid.load_stats(str(tmp_path / "stats.npz"))
    assert loaded.count == 257
    assert np.allclose(loaded.sigma, np.cov(features, rowvar=False))


def test_missing_weights_names_file_and_source(tmp_path):
    missing = str(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    with pytest.raises(fid.InceptionWeightsError) as error:
        fid.load_feature_extractor(missing)
    message = str(error.value)
    assert missing in message
    assert "github.com/mseitzer/pytorch-fid/releases" in message
    assert "inception-2015-12-05.pkl" in message


def test_unreachable_weights_url_gives_advice():
    # Port 9 on 127.0.0.1 has no listener, so the fetch fails at once.
    with pytest.raises(fid.InceptionWeightsError, match="could not fetch.*pytorch-fid"):
        fid.load_feature_extractor("http://127.0.0.1:9/pt_inception-2015-12-05-6726825d.pth")


def test_wrong_state_dict_is_rejected(tmp_path):
    path = str(tmp_path / "other.pth")
    torch.save({"conv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(fid.InceptionWeightsError, match="pytorch-fid Inception-v3 layout"):
        fid.load_feature_extractor(path)


def test_inception_state_dict_standard_path(tmp_path):
    from ddn_dist.inception import InceptionV3Features

    torch.manual_seed(0)
    network = InceptionV3Features().eval()
    state = dict(network.state_dict())
    # The pytorch-fid file also contains the 1008-class head, which feature extraction ignores.
    state["fc.weight"] = torch.zeros(1008, 2048)
    state["fc.bias"] = torch.zeros(1008)
    path = str(tmp_path / "pt_inception-random.pth")
    torch.save(state, path)

    extractor = fid.load_feature_extractor(path)
    assert extractor.kind == "state_dict"
    images = torch.from_numpy(digits_images()[0][:2])
    features = extractor(images)
    assert features.shape == (2, 2048)

    # Standard protocol: uint8 pixels, [0, 1], bilinear 299x299, [-1, 1], grayscale to 3 channels.
    pixels = torch.from_numpy(sampling.to_uint8(images)).permute(0, 3, 1, 2).float() / 255
    resized = F.interpolate(pixels.repeat(1, 3, 1, 1), size=(299, 299), mode="bilinear",
                            align_corners=False)
    with torch.no_grad():
        expected = network(resized * 2 - 1).double()
    assert torch.allclose(features, expected, atol=1e-4)


def test_ref_of_shards_against_same_images(digits_shards, tiny_detector, tmp_path, capsys):
    out = str(tmp_path / "digits_stats.npz")
    assert cli.main(["eval", "ref", digits_shards, "--out", out, "--inception", tiny_detector,
                     "--device", "cpu"]) == 0
    assert "wrote statistics of 1797 images" in capsys.readouterr().out
    reference = fid.load_stats(out)

    extractor = fid.load_feature_extractor(tiny_detector)
    features = extractor(torch.from_numpy(digits_images()[0])).numpy()
    assert reference.count == len(features)
    assert np.allclose(reference.mu, features.mean(axis=0), atol=1e-9)
    distance = fid.frechet_distance(features.mean(axis=0), np.cov(features, rowvar=False),
                                    reference.mu, reference.sigma)
    assert distance < 1e-6


def test_fid_command_matches_numpy(trained_digits, tiny_detector, tmp_path, capsys):
    # Reference: features of the real digits through the same detector.
    extractor = fid.load_feature_extractor(tiny_detector)
    real = extractor(torch.from_numpy(digits_images()[0])).numpy()
    reference = fid.FeatureStats.empty(real.shape[1], extractor.name)
    reference.add(real)
    ref_path = str(tmp_path / "ref.npz")
    reference.save(ref_path)

    assert cli.main(["eval", "fid", trained_digits.snapshot, "--ref", ref_path, "--num", "300",
                     "--inception", tiny_detector, "--device", "cpu", "--batch-size", "128",
                     "--save-stats", str(tmp_path / "gen.npz")]) == 0
    printed = float(re.search(r"FID ([\d.]+) of 300 samples", capsys.readouterr().out).group(1))

    samples = sampling.sample_seeds(trained_digits.model, list(range(300))).images
    generated = extractor(samples).numpy()
    sigma_gen, sigma_real = np.cov(generated, rowvar=False), np.cov(real, rowvar=False)
    trace_sqrt = np.sum(np.sqrt(np.abs(np.linalg.eigvals(sigma_gen @ sigma_real).real)))
    expected = (np.sum((generated.mean(0) - real.mean(0)) ** 2) + np.trace(sigma_gen)
                + np.trace(sigma_real) - 2 * trace_sqrt)
    assert printed == pytest.approx(expected, rel=1e-3, abs=1e-3)
    assert printed > 0.01  # a small model's samples differ from the real digits


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_fid_two_processes_match_one(trained_digits, tiny_detector, tmp_path):
    single = fid.generated_stats(trained_digits.model, fid.load_feature_extractor(tiny_detector),
                                 101, batch_size=32)
    stats_path = str(tmp_path / "two.npz")
    ref_path = str(tmp_path / "ref.npz")
    single.save(ref_path)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "ddn_dist.cli", "eval", "fid", trained_digits.snapshot, "--ref", ref_path,
        "--num-images", "101", "--inception", tiny_detector, "--device", "cpu",
        "--batch-size", "32", "--save-stats", stats_path,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stdout
    two = fid.load_stats(stats_path)
    assert two.count == 101
    assert np.allclose(two.mu, single.mean(), atol=1e-9)
    assert np.allclose(two.sigma, single.covariance(), atol=1e-9)


def test_pickled_detector_loads(tmp_path):
    import pickle

    torch.manual_seed(1)
    network = TinyDetector().eval()
    path = tmp_path / "inception-2015-12-05.pkl"
    path.write_bytes(pickle.dumps(network))
    extractor = fid.load_feature_extractor(str(path))
    assert extractor.kind == "torchscript"
    images = torch.from_numpy(digits_images()[0][:4])
    pixels = torch.from_numpy(sampling.to_uint8(images)).permute(0, 3, 1, 2).repeat(1, 3, 1, 1)
    with torch.no_grad():
        expected = network(pixels, return_features=True).double()
    assert torch.allclose(extractor(images), expected)


@pytest.mark.ceph
def test_ref_from_s3_matches_local(digits_s3_shards, digits_shards, s3_server, tiny_detector,
                                   tmp_path, monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    extractor = fid.load_feature_extractor(tiny_detector)
    remote = fid.reference_stats(digits_s3_shards, extractor, endpoint_url=s3_server.endpoint_url)
    local = fid.reference_stats(digits_shards, extractor)
    assert remote.count == local.count == 1797
    assert np.allclose(remote.mean(), local.mean(), atol=1e-12)
    assert np.allclose(remote.covariance(), local.covariance(), atol=1e-12)
