"""Padding surgery: every padded conv / pool / padding layer re-padded with the weights kept, sizes that follow
the arithmetic, centre-cropped skips in FX graphs and one-line refusals elsewhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from posprobe.backbones import create_backbone, layer_table, repad
from posprobe.backbones.padding import PaddedPool, cropping_add, cropping_cat
from posprobe.errors import PosprobeError


def tiny_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, 2, padding=1),
        nn.ZeroPad2d(2),
        nn.Conv2d(4, 4, 5),
        nn.Conv2d(4, 2, 1),
    ).eval()


def x(size: int = 12) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_modes_equal_explicit_padding_and_keep_the_weights(mode):
    model = tiny_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = repad(model, mode)
    assert (report.convs, report.pools, report.pad_layers) == (1, 1, 1)  # the 1x1 and 5x5 convs pad nothing
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model[2], PaddedPool) and type(model[3]).__name__.lower().startswith(mode[:4])
    ref = tiny_cnn()
    with torch.no_grad():
        h = F.relu(F.conv2d(F.pad(x(), (1, 1, 1, 1), mode=mode), ref[0].weight, ref[0].bias))
        h = F.max_pool2d(F.pad(h, (1, 1, 1, 1), mode=mode), 3, 2)
        h = ref[5](ref[4](F.pad(h, (2, 2, 2, 2), mode=mode)))
        torch.testing.assert_close(model(x()), h)


def test_valid_removes_every_border_and_sizes_shrink():
    model = tiny_cnn()
    report = repad(model, "valid")
    assert report.mode == "valid" and report.cropping_skips == 0 and not report.traced
    assert model[0].padding == (0, 0) and model[2].padding == 0 and isinstance(model[3], nn.Identity)
    # 12 -> conv3 10 -> pool3/2 4 -> conv5 0: too small; 20 -> 18 -> 8 -> 4
    assert model(x(20)).shape[-2:] == (4, 4)


def test_zeros_restores_zero_padding_and_keeps_pooling_as_it_was():
    model = tiny_cnn()
    repad(model, "circular")
    model = tiny_cnn()
    model[0].padding_mode = "reflect"
    repad(model, "zeros")
    assert model[0].padding_mode == "zeros" and isinstance(model[2], nn.MaxPool2d) and model[2].padding == 1


def test_nothing_to_rewrite_or_an_unknown_mode_is_refused():
    with pytest.raises(PosprobeError, match="no padded convolution"):
        repad(nn.Sequential(nn.Conv2d(3, 3, 4, stride=4)), "valid")
    with pytest.raises(PosprobeError, match="unknown backbone padding 'same'.*zeros, reflect"):
        repad(tiny_cnn(), "same")


def test_cropping_sum_crops_the_larger_operand_at_its_centre():
    skip = torch.arange(36.0).view(1, 1, 6, 6)
    branch = torch.zeros(1, 1, 4, 4)
    torch.testing.assert_close(cropping_add(branch, skip), skip[..., 1:5, 1:5])
    gate = torch.ones(1, 1, 1, 1)  # a broadcast operand is not a map to crop to
    assert cropping_add(skip, gate).shape == skip.shape
    assert cropping_cat([skip, branch], 1).shape == (1, 2, 4, 4)


def test_valid_resnet_centre_crops_its_skips_and_sizes_follow_the_arithmetic():
    bb = create_backbone("tv:resnet18", "random", layers="layer1,layer2", padding="valid", image_size=128)
    report = bb.padding_report
    assert report.cropping_skips >= 4 and report.traced and not bb.spec.exact_strides
    assert "centre-crop" in report.describe()
    # conv7/2: 61, maxpool3/2: 30, layer1 (4 convs 3x3): 22, layer2 (3x3/2 then 3 convs): 10 -> 4
    assert [tuple(s[1:]) for s in bb.level_shapes(128)] == [(22, 22), (4, 4)]


def test_valid_residuals_outside_fx_are_refused_in_one_line():
    with pytest.raises(PosprobeError) as err:
        layer_table("timm:convnext_atto", 64, "valid")
    msg = str(err.value)
    assert "breaks a residual connection" in msg and "refused" in msg and "stages.0.blocks.0" in msg
    assert "\n" not in msg


def test_padding_larger_than_a_map_is_explained():
    with pytest.raises(PosprobeError, match=r"reflect padding of timm:convnext_atto needs every padded map larger"):
        layer_table("timm:convnext_atto", 64, "reflect")


def test_layer_table_reports_the_sizes_after_surgery():
    rows = {r.name: r for r in layer_table("vgg16", 212, "valid")}
    assert rows["features.3"].size == (208, 208) and rows["features.3"].aliases == ("relu1_2",)
    assert rows["features.3"].stride == 1  # strides stay nominal
    with pytest.raises(PosprobeError, match="image size 64 is too small for backbone vgg16 after features.18"):
        layer_table("vgg16", 64, "valid")


def test_dynamic_same_padding_is_refused_and_vit_has_nothing_to_pad():
    with pytest.raises(PosprobeError, match="Conv2dSame.*cannot rewrite"):
        layer_table("timm:tf_efficientnet_b0", 64, "reflect")
    with pytest.raises(PosprobeError, match="vit_tiny_patch16_224 has no padded convolution"):
        layer_table("timm:vit_tiny_patch16_224", 64, "zeros")


@pytest.mark.slow
def test_vgg16_with_valid_padding_is_the_vgg16_nopad_preset(random_backbone):
    a = create_backbone("vgg16", "random", seed=0, padding="valid")
    b = random_backbone("vgg16_nopad")  # shared with test_backbones: VGG16 takes seconds to build
    with torch.inference_mode():
        for fa, fb in zip(a(x(196)), b(x(196))):
            torch.testing.assert_close(fa, fb)
