"""Pyramid and recurrence DDN: presets, capacity, sampling, encoding and batch-invariant decoding."""

import math
from pathlib import Path

import pytest
import torch
import yaml

from ddn_dist.model import DDN, DDNOutput, ModelConfig, build_model

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def preset(name):
    return ModelConfig.from_dict(yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())["model"])


def expected_parameters(resolution, image_channels, max_blocks, max_k, max_channels=256):
    """Parameter count from the architecture rules, written out by hand."""
    total = 0
    previous = None
    for scale in range(int(math.log2(resolution)) + 1):
        channels = min(max(4, min(2 ** (13 - scale), 256)), max_channels)
        k = min(max(16, 4 * channels), 1024) // (2 if image_channels > 1 else 1)
        k = min(k, max_k)
        for block in range(min(2**scale, max_blocks)):
            c_in = channels if previous is None else previous
            conv0 = 9 * c_in * channels + channels
            conv1 = 9 * channels * channels + channels
            norms = 2 * c_in + 2 * channels
            skip = c_in * channels + channels if c_in != channels else 0
            head = k * image_channels * (channels // 2)
            total += conv0 + conv1 + norms + skip + head
            previous = channels
    return total


def parameters(cfg):
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(cfg).parameters())


def test_cifar10_preset_counts():
    cfg = preset("cifar10")
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.num_layers == 63
    assert model.ks == [64] * 63
    assert model.latent_bits == pytest.approx(378.0)
    count = parameters(cfg)
    assert count == pytest.approx(76e6, rel=0.02)
    assert count == expected_parameters(32, 3, 32, 64)


def test_ffhq64_preset_counts():
    cfg = preset("ffhq64")
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.num_layers == 127
    assert model.ks == [512] * 63 + [256] * 64
    assert model.latent_bits == pytest.approx(63 * 9 + 64 * 8)
    assert model.layer_groups[0] == "1x1"
    assert model.layer_groups[-1] == "64x64"
    count = parameters(cfg)
    assert count == pytest.approx(109e6, rel=0.02)
    assert count == expected_parameters(64, 3, 64, 512)


def test_digits_capacity_and_bits():
    cfg = preset("digits")
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.num_layers == 15
    assert model.ks == [4] * 15
    assert model.num_outputs == 4**15
    assert model.latent_bits == pytest.approx(15 * 2)
    assert parameters(cfg) == expected_parameters(8, 1, 8, 4, max_channels=cfg.max_channels)


def small_model(**options):
    torch.manual_seed(0)
    values = dict(resolution=8, image_channels=3, max_channels=16, max_k=8, max_blocks=2)
    values.update(options)
    return build_model(ModelConfig(**values))


def test_training_output_fields():
    model = small_model().train()
    target = torch.rand(4, 3, 8, 8) * 2 - 1
    out = model(target)
    assert isinstance(out, DDNOutput)
    assert out.image.shape == (4, 3, 8, 8)
    assert out.codes.shape == (4, model.num_layers)
    assert out.codes.dtype == torch.long
    assert out.layer_losses.shape == (model.num_layers,)
    assert out.layer_losses.requires_grad
    assert torch.allclose(out.loss, out.layer_losses.mean())
    assert out.per_sample_loss.shape == (4,)
    assert torch.allclose(out.per_sample_loss.mean(), out.loss, atol=1e-6)
    final_mse = (out.image - target).square().mean()
    assert torch.allclose(out.layer_losses[-1], final_mse, atol=1e-6)


def test_valid_mask_excludes_padding():
    model = small_model().eval()
    target = torch.rand(4, 3, 8, 8) * 2 - 1
    valid = torch.tensor([True, True, False, True])
    masked = model(target, valid=valid)
    subset = model(target[valid])
    assert torch.allclose(masked.layer_losses, subset.layer_losses, atol=1e-6)


@pytest.mark.parametrize("architecture", ["pyramid", "recurrence"])
def test_decode_is_batch_invariant(architecture):
    model = small_model(architecture=architecture, recurrence_channels=16, recurrence_k=8,
                        recurrence_passes=4, recurrence_blocks=1).eval()
    generator = torch.Generator().manual_seed(3)
    code = torch.stack([torch.randint(k, (1,), generator=generator) for k in model.ks], dim=1)
    alone = model.decode(code)
    for batch in (2, 5, 9):
        others = torch.stack([torch.randint(k, (batch,), generator=generator) for k in model.ks], dim=1)
        for position in (0, batch - 1):
            codes = others.clone()
            codes[position] = code[0]
            image = model.decode(codes)[position : position + 1]
            # Convolutions on CPU pick kernels by batch size, so images agree to rounding only.
            assert torch.allclose(image, alone, rtol=0, atol=1e-5), (batch, position)


def test_encode_then_decode_reproduces_guided_image():
    model = small_model().eval()
    images = torch.rand(3, 3, 8, 8) * 2 - 1
    codes = model.encode(images)
    guided = model(images).image
    assert torch.allclose(model.decode(codes), guided, atol=1e-5)


def test_sample_is_seeded_and_uniform_range():
    model = small_model().eval()
    first = model.sample(6, generator=torch.Generator().manual_seed(7))
    second = model.sample(6, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first.codes, second.codes)
    assert torch.equal(first.image, second.image)
    assert int(first.codes.min()) >= 0
    assert int(first.codes.max()) < 8
    assert torch.allclose(model.decode(first.codes), first.image, atol=1e-6)


def test_float_codes_scale_by_k():
    model = small_model().eval()
    fractions = torch.full((1, model.num_layers), 0.5)
    out = model(codes=fractions)
    assert torch.equal(out.codes, torch.full((1, model.num_layers), 4))


def test_select_fn_generation():
    model = small_model().eval()
    calls = []

    def pick_last(layer, candidates):
        calls.append(layer)
        return torch.full((candidates.shape[0],), candidates.shape[1] - 1, dtype=torch.long)

    out = model(select_fn=pick_last, num=2)
    assert calls == list(range(model.num_layers))
    assert torch.equal(out.codes, torch.full((2, model.num_layers), 7))


def test_recurrence_shares_one_ddl():
    model = small_model(architecture="recurrence", recurrence_channels=16, recurrence_k=8,
                        recurrence_passes=5, recurrence_blocks=1, learning_residual=False)
    assert len(model.ddls) == 1
    assert model.num_layers == 5
    assert model.ks == [8] * 5
    target = torch.rand(2, 3, 8, 8) * 2 - 1
    out = model(target)
    out.loss.backward()
    assert out.codes.shape == (2, 5)
    assert model.blocks[0].conv0.weight.grad is not None


def test_training_reduces_loss():
    model = small_model(chain_dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    target = torch.rand(8, 3, 8, 8) * 2 - 1
    first = float(model(target).loss.detach())
    for _ in range(30):
        loss = model(target).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(model(target).loss.detach()) < 0.8 * first


@pytest.mark.parametrize(
    "values, message",
    [
        ({"resolutoin": 8}, "valid options are"),
        ({"architecture": "unet"}, "valid choices are \\['pyramid', 'recurrence'\\]"),
        ({"resolution": 24}, "power of two"),
        ({"chain_dropout": 1.5}, "probability"),
        ({"max_channels": 4}, "cannot hold"),
    ],
)
def test_config_rejects_bad_values(values, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(values)


def test_target_shape_is_checked():
    model = small_model()
    with pytest.raises(ValueError, match=r"\(B, 3, 8, 8\)"):
        model(torch.zeros(2, 1, 8, 8))


def test_build_model_type():
    assert isinstance(small_model(), DDN)


def test_group_means_average_layers():
    model = small_model()  # groups 1x1, 2x2 x2, 4x4 x2, 8x8 x2
    values = torch.arange(model.num_layers, dtype=torch.float32)
    assert model.group_means(values) == {"1x1": 0.0, "2x2": 1.5, "4x4": 3.5, "8x8": 5.5}
