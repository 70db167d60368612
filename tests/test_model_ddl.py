"""Discrete Distribution Layer: selection, gradients, chain dropout, leak choice."""

import pytest
import torch
from torch.nn import functional as F

from ddn_dist.model import DiscreteDistributionLayer
from ddn_dist.model.ddl import distances_direct, distances_expansion


def make_layer(image_channels=3, channels=16, k=8, **options):
    torch.manual_seed(0)
    return DiscreteDistributionLayer(channels, k, image_channels, **options)


def reference_candidates(layer, feature, residual):
    """All K candidates through an ordinary 1x1 convolution: (B, K, C_img, h, w)."""
    weight = layer.weight.detach().view(-1, layer.head_channels, 1, 1)
    out = F.conv2d(feature[:, : layer.head_channels], weight)
    batch, _, height, width = feature.shape
    return out.view(batch, layer.k, layer.image_channels, height, width) + residual.unsqueeze(1)


@pytest.mark.parametrize("image_channels", [1, 3])
@pytest.mark.parametrize("selection", ["direct", "expansion"])
def test_selection_is_argmin_of_distances(image_channels, selection):
    layer = make_layer(image_channels, selection=selection).eval()
    feature = torch.randn(6, 16, 8, 8)
    previous = torch.randn(6, image_channels, 4, 4)
    target = torch.randn(6, image_channels, 8, 8)
    out = layer(feature, previous, target=target)

    residual = F.interpolate(previous, size=(8, 8), mode="bilinear", align_corners=False)
    candidates = reference_candidates(layer, feature, residual)
    distances = (candidates - target.unsqueeze(1)).square().mean(dim=(2, 3, 4))
    selected = distances.gather(1, out.indices.unsqueeze(1)).squeeze(1)
    assert torch.allclose(selected, distances.min(dim=1).values, rtol=1e-5, atol=1e-6)
    rows = torch.arange(6)
    assert torch.allclose(out.image, candidates[rows, out.indices], atol=1e-5)
    assert torch.allclose(out.loss, selected, rtol=1e-5, atol=1e-6)


def test_expansion_distances_match_direct():
    torch.manual_seed(1)
    head_input = torch.randn(5, 32, 16, 16)
    weight = torch.randn(64 * 3, 32) * 0.2
    residual = torch.randn(5, 3, 16, 16)
    target = torch.randn(5, 3, 16, 16)
    direct = distances_direct(head_input, weight, residual, target)
    expansion = distances_expansion(head_input, weight, residual, target)
    assert direct.shape == (5, 64)
    assert torch.allclose(expansion, direct, rtol=1e-4, atol=1e-4)
    # Near-ties may pick another head, so compare the selected distances.
    picked = direct.gather(1, expansion.argmin(1, keepdim=True)).squeeze(1)
    assert torch.allclose(picked, direct.min(1).values, rtol=1e-4, atol=1e-5)


def test_gradients_reach_only_selected_heads():
    layer = make_layer(3, k=8).train()
    layer.chain_dropout = 0.0
    feature = torch.randn(3, 16, 4, 4, requires_grad=True)
    target = torch.randn(3, 3, 4, 4)
    out = layer(feature, None, target=target)
    out.loss.mean().backward()

    grad = layer.weight.grad.view(8, 3, -1)
    selected = set(out.indices.tolist())
    for head in range(8):
        norm = float(grad[head].abs().sum())
        if head in selected:
            assert norm > 0, f"selected head {head} got no gradient"
        else:
            assert norm == 0, f"unselected head {head} got gradient {norm}"
    # The selected candidate is not detached: the loss reaches the input feature.
    assert feature.grad is not None
    assert float(feature.grad.abs().sum()) > 0


def test_next_feature_adds_image_and_leak():
    layer = make_layer(1, channels=8, k=4, learning_residual=False).eval()
    feature = torch.randn(2, 8, 4, 4)
    indices = torch.tensor([3, 1])
    out = layer(feature, None, indices=indices)

    heads = layer.weight.detach().view(4, 1, 4)
    expected = feature.clone()
    for b, head in enumerate(indices.tolist()):
        image = torch.einsum("ic,chw->ihw", heads[head], feature[b, :4])
        leak = torch.einsum("ic,chw->ihw", heads[head], feature[b, 4:])
        expected[b, 0:1] += image
        expected[b, 7:8] += leak
        assert torch.allclose(out.image[b], image, atol=1e-6)
    assert torch.allclose(out.feature, expected, atol=1e-6)


def test_first_layer_residual_is_zero():
    layer = make_layer(3).eval()
    feature = torch.randn(2, 16, 2, 2)
    out = layer(feature, None, indices=torch.tensor([0, 5]))
    candidates = reference_candidates(layer, feature, torch.zeros(2, 3, 2, 2))
    assert torch.allclose(out.image, candidates[torch.arange(2), out.indices], atol=1e-6)


def test_chain_dropout_rate():
    layer = make_layer(3, k=16, chain_dropout=0.3).train()
    feature = torch.randn(16, 16, 4, 4)
    target = torch.randn(16, 3, 4, 4)
    argmin = layer.eval()(feature, None, target=target).indices
    layer.train()
    torch.manual_seed(5)
    passes = 400
    dropped = 0
    for _ in range(passes):
        indices = layer(feature, None, target=target).indices
        dropped += int(not torch.equal(indices, argmin))
    rate = dropped / passes
    standard_error = (0.3 * 0.7 / passes) ** 0.5
    assert abs(rate - 0.3) < 4.5 * standard_error, f"chain dropout rate {rate:.3f}, expected 0.3"

    # Statistics record the argmin, never the random override.
    stats = layer.pending_stats()
    expected_count = torch.bincount(argmin, minlength=16).double() * passes
    assert torch.equal(stats.count, expected_count)
    assert float(stats.seen) == 16 * passes


def test_select_fn_receives_all_candidates():
    layer = make_layer(3, k=8).eval()
    feature = torch.randn(4, 16, 4, 4)
    seen_shapes = []

    def pick_brightest(layer_index, candidates):
        seen_shapes.append((layer_index, tuple(candidates.shape)))
        return candidates.mean(dim=(2, 3, 4)).argmax(dim=1)

    out = layer(feature, None, select_fn=pick_brightest, layer_index=7)
    assert seen_shapes == [(7, (4, 8, 3, 4, 4))]
    expected = reference_candidates(layer, feature, torch.zeros(4, 3, 4, 4)).mean(dim=(2, 3, 4)).argmax(1)
    assert torch.equal(out.indices, expected)


def test_invalid_indices_are_rejected():
    layer = make_layer(3, k=8).eval()
    with pytest.raises(ValueError, match="valid heads are 0..7"):
        layer(torch.randn(2, 16, 2, 2), None, indices=torch.tensor([0, 8]))


@pytest.mark.parametrize("leak_choice", [True, False])
def test_inject_gradients_match_plain_autograd(leak_choice):
    layer = make_layer(3, channels=12, k=5, leak_choice=leak_choice).double().eval()
    torch.manual_seed(3)
    feature = torch.randn(4, 12, 3, 3, dtype=torch.float64, requires_grad=True)
    previous = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    indices = torch.tensor([4, 0, 4, 2])
    weights = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    feature_weights = torch.randn(4, 12, 3, 3, dtype=torch.float64)

    def objective(out_image, out_feature):
        return (out_image * weights).sum() + (out_feature.square() * feature_weights).sum()

    out = layer(feature, previous, indices=indices)
    fast = torch.autograd.grad(objective(out.image, out.feature), [feature, previous, layer.weight])

    image, leak = layer.selected_output(feature, indices)
    image = image + previous
    reference_feature = layer.next_feature(feature, image, leak)
    assert torch.allclose(out.image, image)
    assert torch.allclose(out.feature, reference_feature)
    slow = torch.autograd.grad(objective(image, reference_feature), [feature, previous, layer.weight])
    for name, a, b in zip(["feature", "previous", "weight"], fast, slow):
        assert torch.allclose(a, b, atol=1e-10), name
