"""The PEM readout against a reference written here with torch.nn.functional only."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import posprobe
from posprobe.errors import PosprobeError
from posprobe.features.parts import align
from posprobe.readouts.pem import Readout, check_readout_config, readout_map_size

LEVEL_SHAPES = [(2, 9, 9), (3, 30, 30), (1, 7, 11)]  # (channels, h, w) of three tapped levels
IN_CHANNELS = sum(c for c, _, _ in LEVEL_SHAPES)
FEAT, OUT = 14, 20


def make_levels(batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, h, w, generator=g) for c, h, w in LEVEL_SHAPES]


def random_params(
    in_channels: int, kernel: int, depth: int, seed: int = 1, width: int | None = None
) -> list[dict[str, torch.Tensor]]:
    """Weights for each layer (conv weight/bias, BN affine and running stats), all non-trivial."""
    g = torch.Generator().manual_seed(seed)
    width = width or in_channels
    params = []
    for i in range(depth):
        out = 1 if i == depth - 1 else width
        inputs = in_channels if i == 0 else width
        params.append(
            {
                "w": 0.3 * torch.randn(out, inputs, kernel, kernel, generator=g),
                "b": 0.1 * torch.randn(out, generator=g),
                "gamma": 1 + 0.2 * torch.randn(out, generator=g),
                "beta": 0.1 * torch.randn(out, generator=g),
                "mean": 0.2 * torch.randn(out, generator=g),
                "var": 0.5 + torch.rand(out, generator=g),
            }
        )
    return params


def copy_into(readout: Readout, params: list[dict[str, torch.Tensor]]) -> None:
    convs = [m for m in readout.modules() if isinstance(m, nn.Conv2d)]
    bns = [m for m in readout.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == len(bns) == len(params)
    with torch.no_grad():
        for conv, bn, p in zip(convs, bns, params):
            conv.weight.copy_(p["w"])
            conv.bias.copy_(p["b"])
            bn.weight.copy_(p["gamma"])
            bn.bias.copy_(p["beta"])
            bn.running_mean.copy_(p["mean"])
            bn.running_var.copy_(p["var"])


def reference_readout(levels, params, padding, feat_size, out_size, training=False, eps=1e-5, momentum=0.1):
    """PAPER.md's PEM: resize each level (align_corners=True), concat, [conv-BN-ReLU]*, conv-BN-sigmoid, upsample."""
    x = torch.cat(
        [F.interpolate(f, size=(feat_size, feat_size), mode="bilinear", align_corners=True) for f in levels], dim=1
    )
    for i, p in enumerate(params):
        x = F.conv2d(x, p["w"], p["b"], padding=padding)
        x = F.batch_norm(x, p["mean"], p["var"], p["gamma"], p["beta"], training=training, momentum=momentum, eps=eps)
        x = torch.sigmoid(x) if i == len(params) - 1 else F.relu(x)
    return F.interpolate(x, size=(out_size, out_size), mode="bilinear", align_corners=False)


CONFIGS = [(d, k, p) for d in (1, 2, 3) for k in (1, 3, 5) for p in (0, 1, 2)]


@pytest.mark.parametrize("depth,kernel,padding", CONFIGS)
def test_eval_forward_matches_reference(depth, kernel, padding):
    readout = Readout(IN_CHANNELS, kernel, depth, padding, FEAT, OUT).eval()
    params = random_params(IN_CHANNELS, kernel, depth)
    copy_into(readout, params)
    levels = make_levels()
    with torch.no_grad():
        got = readout(levels)
    expected = reference_readout(levels, params, padding, FEAT, OUT)
    assert got.shape == (2, 1, OUT, OUT)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("depth,width", [(2, 2), (3, 4), (3, 1)])
def test_narrow_intermediate_layers_match_reference(depth, width):
    """``width``: Conv(C->w), [Conv(w->w)], Conv(w->1), the quick profile's cheaper deep readout."""
    readout = Readout(IN_CHANNELS, 3, depth, 1, FEAT, OUT, width=width).eval()
    params = random_params(IN_CHANNELS, 3, depth, width=width)
    copy_into(readout, params)
    levels = make_levels()
    with torch.no_grad():
        got = readout(levels)
    torch.testing.assert_close(got, reference_readout(levels, params, 1, FEAT, OUT), rtol=1e-5, atol=1e-6)
    assert f"width={width}" in repr(readout)


def test_width_is_refused_below_one():
    with pytest.raises(PosprobeError, match="width must be >= 1"):
        Readout(IN_CHANNELS, 3, 2, 0, FEAT, OUT, width=0)


@pytest.mark.parametrize("depth,kernel,padding", [(1, 3, 0), (2, 3, 1), (3, 1, 2)])
def test_train_forward_matches_reference_and_updates_running_stats(depth, kernel, padding):
    readout = Readout(IN_CHANNELS, kernel, depth, padding, FEAT, OUT).train()
    params = random_params(IN_CHANNELS, kernel, depth)
    copy_into(readout, params)
    ref_params = [{k: v.clone() for k, v in p.items()} for p in params]
    levels = make_levels(batch=4)
    with torch.no_grad():
        got = readout(levels)
    expected = reference_readout(levels, ref_params, padding, FEAT, OUT, training=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    bns = [m for m in readout.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn, p in zip(bns, ref_params):  # F.batch_norm updated the reference's running stats in place
        torch.testing.assert_close(bn.running_mean, p["mean"])
        torch.testing.assert_close(bn.running_var, p["var"])


@pytest.mark.parametrize("depth,kernel,padding", CONFIGS)
def test_layer_structure(depth, kernel, padding):
    readout = Readout(IN_CHANNELS, kernel, depth, padding, FEAT, OUT)
    convs = [m for m in readout.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == depth
    for i, conv in enumerate(convs):
        out = 1 if i == depth - 1 else IN_CHANNELS
        assert conv.weight.shape == (out, IN_CHANNELS, kernel, kernel)
        assert conv.padding == (padding, padding) and conv.stride == (1, 1)
    kinds = [type(m) for m in readout.head]
    assert kinds[-3:] == [nn.Conv2d, nn.BatchNorm2d, nn.Sigmoid]
    assert kinds.count(nn.ReLU) == depth - 1


@pytest.mark.parametrize("depth,kernel,padding", CONFIGS)
def test_head_map_size(depth, kernel, padding):
    readout = Readout(IN_CHANNELS, kernel, depth, padding, FEAT, OUT).eval()
    x = torch.zeros(1, IN_CHANNELS, FEAT, FEAT)
    side = FEAT
    for _ in range(depth):
        side = side + 2 * padding - kernel + 1
    assert readout.head(x).shape == (1, 1, side, side)
    assert readout_map_size(FEAT, kernel, depth, padding) == side


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("depth,kernel", [(1, 1), (1, 3), (2, 3), (3, 5)])
def test_xavier_uniform_weights_and_zero_biases(depth, kernel, seed):
    torch.manual_seed(seed)
    channels = 64
    readout = Readout(channels, kernel, depth, 1, 28, 56)
    for conv in [m for m in readout.modules() if isinstance(m, nn.Conv2d)]:
        fan_in = conv.in_channels * kernel * kernel
        fan_out = conv.out_channels * kernel * kernel
        bound = math.sqrt(6 / (fan_in + fan_out))
        w = conv.weight.detach().abs()
        assert w.max() <= bound
        if w.numel() >= 500:  # then some |w| is near the bound (PyTorch's default bound is smaller here)
            assert w.max() > 0.9 * bound
        assert torch.all(conv.bias == 0)


def test_batchnorm_starts_as_identity():
    readout = Readout(5, 3, 2, 1, 10, 10)
    for bn in [m for m in readout.modules() if isinstance(m, nn.BatchNorm2d)]:
        assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_output_is_in_unit_interval_with_requested_shape():
    readout = Readout(IN_CHANNELS, 3, 1, 0, FEAT, 37).eval()
    out = readout(make_levels(batch=3))
    assert out.shape == (3, 1, 37, 37)
    assert torch.all((out > 0) & (out < 1))


def test_align_matches_reference():
    levels = make_levels()
    expected = torch.cat([F.interpolate(f, size=(FEAT, FEAT), mode="bilinear", align_corners=True) for f in levels], 1)
    torch.testing.assert_close(align(levels, FEAT), expected)


def test_align_keeps_corner_pixels():
    """align_corners=True maps corner to corner: the resized map's corners are the level's corners."""
    level = torch.randn(1, 2, 5, 9)
    out = align([level], 28)
    for yi, xi in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        torch.testing.assert_close(out[..., yi, xi], level[..., yi, xi])


def test_forward_is_align_then_forward_aligned():
    readout = Readout(IN_CHANNELS, 3, 2, 1, FEAT, OUT).eval()
    levels = make_levels()
    torch.testing.assert_close(readout(levels), readout.forward_aligned(align(levels, FEAT)))


def test_forward_accepts_a_single_tensor():
    readout = Readout(3, 3, 1, 0, FEAT, OUT).eval()
    image = torch.rand(2, 3, 40, 40)
    torch.testing.assert_close(readout(image), readout([image]))


def test_top_level_export():
    assert posprobe.Readout is Readout


@pytest.mark.parametrize(
    "feat,kernel,depth,padding",
    [(4, 3, 3, 0), (2, 3, 1, 0), (5, 5, 2, 0), (28, 29, 1, 0), (28, 3, 14, 0)],
)
def test_impossible_config_is_refused_at_construction(feat, kernel, depth, padding):
    assert readout_map_size(feat, kernel, depth, padding) < 1
    with pytest.raises(PosprobeError, match="impossible readout"):
        Readout(8, kernel, depth, padding, feat, 16)


@pytest.mark.parametrize("feat,kernel,depth,padding", [(28, 0, 1, 0), (28, 3, 0, 0), (28, 3, 1, -1), (0, 1, 1, 0)])
def test_invalid_settings_are_refused(feat, kernel, depth, padding):
    with pytest.raises(PosprobeError):
        check_readout_config(feat, kernel, depth, padding)


@pytest.mark.parametrize("feat,kernel,depth,padding", [(3, 3, 1, 0), (4, 3, 3, 2), (28, 28, 1, 0), (1, 1, 5, 0)])
def test_smallest_possible_configs_work(feat, kernel, depth, padding):
    readout = Readout(2, kernel, depth, padding, feat, 8).eval()
    assert readout(torch.rand(1, 2, feat, feat)).shape == (1, 1, 8, 8)


@pytest.mark.parametrize(
    "feat,kernel,depth,padding,expected",
    [
        (28, 3, 1, 0, 26),
        (28, 3, 3, 0, 22),
        (28, 3, 1, 1, 28),
        (28, 3, 1, 2, 30),
        (28, 7, 1, 0, 22),
        (28, 1, 3, 0, 28),
        (28, 5, 2, 1, 24),
        (28, 1, 1, 2, 32),
    ],
)
def test_readout_map_size_arithmetic(feat, kernel, depth, padding, expected):
    assert readout_map_size(feat, kernel, depth, padding) == expected
