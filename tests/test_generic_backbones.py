"""tv:NAME and timm:NAME backbones: layer discovery and selection, the tapped tensors' contract, weights,
input normalisation from the weights' config, and the ViT position-embedding controls. Random weights,
64-px inputs; every model is built once per module."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision

from posprobe.backbones import create_backbone, get_backbone_spec, layer_table
from posprobe.errors import PosprobeError

SIZE = 64
MODELS = [
    "tv:resnet18",
    "timm:convnext_atto",
    "timm:efficientnet_b0",
    "timm:vit_tiny_patch16_224",
    "timm:swin_tiny_patch4_window7_224",
]


@pytest.fixture(scope="module")
def built():
    cache: dict[tuple, object] = {}

    def get(name: str, **kwargs):
        key = (name, tuple(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = create_backbone(name, "random", seed=0, image_size=SIZE, **kwargs)
        return cache[key]

    return get


def images(n: int = 2, size: int = SIZE) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


# ---- the contract: declared channels and strides are the tensors' -------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_declared_levels_match_the_tensors(name, built):
    bb = built(name)
    with torch.inference_mode():
        maps = bb(images())
    assert len(maps) == len(bb.levels) >= 1
    for level, m in zip(bb.levels, maps):
        assert m.dim() == 4 and m.shape[0] == 2, level
        assert m.shape[1] == level.channels, level  # NCHW, channels where declared (Swin normalised too)
        assert tuple(m.shape[2:]) == (math.ceil(SIZE / level.stride),) * 2, level
    assert bb.channels == sum(level.channels for level in bb.levels)
    assert [tuple(s) for s in bb.level_shapes(SIZE)] == [tuple(m.shape[1:]) for m in maps]


@pytest.mark.parametrize("name", MODELS)
def test_layer_table_rows_match_their_strides_and_defaults_are_the_taps(name, built):
    rows = layer_table(name, SIZE)
    assert len(rows) >= len(built(name).levels)
    for r in rows:
        assert r.size == (math.ceil(SIZE / r.stride),) * 2, r
    defaults = [r for r in rows if r.default]
    assert [(r.channels, r.stride) for r in defaults] == [(lv.channels, lv.stride) for lv in built(name).levels]


@pytest.mark.parametrize("name", MODELS)
def test_backbone_is_frozen_and_in_eval_mode(name, built):
    bb = built(name)
    bb.train()
    assert not bb.training and not any(m.training for m in bb.modules())
    assert not any(p.requires_grad for p in bb.parameters())


def test_timm_defaults_are_stage_ends_for_cnns_and_quarter_blocks_for_vits(built):
    assert [lv.name for lv in built("timm:convnext_atto").levels] == [f"stages.{i}" for i in range(4)]
    assert [lv.name for lv in built("timm:vit_tiny_patch16_224").levels] == [
        "blocks.2",
        "blocks.5",
        "blocks.8",
        "blocks.11",
    ]
    assert [lv.stride for lv in built("timm:efficientnet_b0").levels] == [2, 4, 8, 16, 32]


def test_tv_default_taps_are_the_resolution_stage_outputs(built):
    assert [lv.name for lv in built("tv:resnet18").levels] == ["relu", "layer1", "layer2", "layer3", "layer4"]


# ---- the taps are the model's own activations -----------------------------------------------------------------


def test_tv_taps_equal_a_manual_run_of_the_torchvision_model(built):
    bb = built("tv:resnet18")  # relu, layer1, layer2, layer3, layer4
    ref = torchvision.models.resnet18().eval()
    state = {k.removeprefix("graph_module."): v for k, v in bb.extractor.state_dict().items()}
    assert not [k for k in ref.load_state_dict(state, strict=False).missing_keys if not k.startswith("fc.")]
    x = images()
    with torch.inference_mode():
        got = bb(x)
        stem = ref.relu(ref.bn1(ref.conv1(x)))
        l1 = ref.layer1(ref.maxpool(stem))
        l2 = ref.layer2(l1)
        l4 = ref.layer4(ref.layer3(l2))
    for g, e in zip([got[0], got[1], got[2], got[4]], [stem, l1, l2, l4]):
        torch.testing.assert_close(g, e)


def test_vit_taps_are_the_patch_tokens_on_their_grid_without_the_class_token(built):
    bb = built("timm:vit_tiny_patch16_224")  # blocks 2, 5, 8, 11
    vit = bb.extractor.model
    x = images()
    with torch.inference_mode():
        got = bb(x)[-1]
        tokens = vit.blocks(vit.norm_pre(vit._pos_embed(vit.patch_embed(x))))  # (B, 1 + 16, 192)
    assert tokens.shape[1] == 1 + (SIZE // 16) ** 2
    grid = tokens[:, 1:].reshape(2, SIZE // 16, SIZE // 16, -1).permute(0, 3, 1, 2)  # (B, 192, 4, 4)
    torch.testing.assert_close(got, grid)


# ---- choosing layers -----------------------------------------------------------------------------------------


def test_tv_layers_by_module_or_node_name_in_network_order(built):
    bb = built("tv:resnet18", layers="layer4,layer1.0.conv1")
    assert [(lv.name, lv.channels, lv.stride) for lv in bb.levels] == [("layer1.0.conv1", 64, 4), ("layer4", 512, 32)]


def test_timm_layers_by_index_or_module_name(built):
    bb = built("timm:convnext_atto", layers="2,stages.0")
    assert [lv.name for lv in bb.levels] == ["stages.0", "stages.2"]


def test_preset_takes_any_node_and_its_own_level_names():
    spec = get_backbone_spec("resnet18")
    from posprobe.backbones.registry import select_layers

    chosen = select_layers(spec, ["layer3", "layer1.0.conv1"])
    assert [(lv.name, lv.channels, lv.stride) for lv in chosen.levels] == [
        ("layer1.0.conv1", 64, 4),
        ("layer3", 256, 16),
    ]
    vgg = select_layers(get_backbone_spec("vgg16"), "features.10,relu4_3")
    assert [(lv.name, lv.channels, lv.stride) for lv in vgg.levels] == [("features.10", 256, 4), ("relu4_3", 512, 8)]


def test_all_layers_of_a_timm_vit_are_its_blocks():
    spec = get_backbone_spec("timm:vit_tiny_patch16_224", SIZE)
    from posprobe.backbones.registry import select_layers

    assert [lv.name for lv in select_layers(spec, "all").levels] == [f"blocks.{i}" for i in range(12)]


@pytest.mark.parametrize(
    "name, bad, suggestion",
    [
        ("tv:resnet18", "layer5", "layer4"),
        ("timm:convnext_atto", "stage.2", "stages.2"),
        ("resnet18", "layer_3", "layer3"),
    ],
)
def test_unknown_layer_lists_and_suggests(name, bad, suggestion):
    with pytest.raises(PosprobeError) as err:
        create_backbone(name, "random", layers=bad, image_size=SIZE)
    msg = str(err.value)
    assert "\n" not in msg and f"unknown layer of {name} '{bad}'" in msg
    assert f"Did you mean '{suggestion}'?" in msg and f"posprobe layers {name}" in msg


def test_repeated_or_empty_layers_are_refused():
    with pytest.raises(PosprobeError, match="more than once"):
        create_backbone("tv:resnet18", "random", layers="layer1,layer1")
    with pytest.raises(PosprobeError, match="names no layer"):
        create_backbone("tv:resnet18", "random", layers=" , ")


# ---- names, weights, preprocessing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("tv:resnet181", "Did you mean 'resnet18'?"),
        ("timm:convnxt_atto", "Did you mean 'convnext_atto'?"),
        ("tf:resnet18", "unknown backbone family 'tf:'"),
        ("timm:", "names no model"),
    ],
)
def test_unknown_models_get_one_line_with_a_suggestion(name, fragment):
    with pytest.raises(PosprobeError) as err:
        get_backbone_spec(name)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_timm_name_with_a_weight_tag_points_to_weights():
    with pytest.raises(PosprobeError, match=r"--backbone timm:convnext_atto --weights d2_in1k"):
        get_backbone_spec("timm:convnext_atto.d2_in1k")


def test_timm_pretrained_weights_offline_give_the_clear_error(monkeypatch):
    from posprobe.backbones import timm_models

    monkeypatch.setenv("POSPROBE_OFFLINE", "1")
    monkeypatch.setattr(timm_models, "cached_weights", lambda cfg: None)  # as on a machine that never downloaded
    with pytest.raises(PosprobeError) as err:
        create_backbone("timm:convnext_atto", image_size=SIZE)  # default: the pretrained weights
    msg = str(err.value)
    assert "not available offline" in msg and "timm/convnext_atto" in msg and "--weights random" in msg


def test_tv_weights_offline_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("POSPROBE_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PosprobeError, match=r"not available offline: put resnet18-f37072fd\.pth"):
        create_backbone("tv:resnet18", "IMAGENET1K_V1")
    with pytest.raises(PosprobeError, match=r"unknown weights 'imagenet21k'.*IMAGENET1K_V1, DEFAULT, random"):
        create_backbone("tv:resnet18", "imagenet21k")


def test_timm_local_checkpoint_loads_the_same_network(tmp_path, built):
    src = built("timm:convnext_atto")
    path = tmp_path / "atto.pt"
    torch.save({"state_dict": src.extractor.model.state_dict()}, path)
    loaded = create_backbone("timm:convnext_atto", str(path), seed=7, image_size=SIZE)
    x = images()
    with torch.inference_mode():
        for a, b in zip(src(x), loaded(x)):
            torch.testing.assert_close(a, b)
    assert loaded.weights_label == str(path)


def test_timm_checkpoint_of_another_model_is_refused(tmp_path, built):
    path = tmp_path / "resnet.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(PosprobeError, match="resnet.pt"):
        create_backbone("timm:convnext_atto", str(path), image_size=SIZE)


def test_random_weights_follow_the_seed(built):
    a = built("timm:convnext_atto")
    b = create_backbone("timm:convnext_atto", "random", seed=1, image_size=SIZE)
    assert not torch.equal(a.extractor.model.stem[0].weight, b.extractor.model.stem[0].weight)
    with torch.random.fork_rng(devices=[]):  # the same draws as create_backbone's for seed 1
        torch.manual_seed(1)
        import timm

        ref = timm.create_model("convnext_atto")
    assert torch.equal(b.extractor.model.stem[0].weight, ref.stem[0].weight)


def test_input_norm_weights_comes_from_the_pretrained_config():
    vit = create_backbone("timm:vit_tiny_patch16_224", "random", input_norm="weights", image_size=SIZE)
    assert torch.allclose(vit.mean.flatten(), torch.tensor([0.5] * 3)) and vit.interpolation == "bicubic"
    tv = get_backbone_spec("tv:resnet18")
    assert tv.norm == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)) and tv.interpolation == "bilinear"


def test_fixed_size_model_refuses_another_input_size(built):
    bb = built("timm:vit_tiny_patch16_224")
    assert bb.spec.input_size == SIZE
    with pytest.raises(PosprobeError, match=r"built for 64x64 inputs and cannot take 96x96"):
        bb(images(1, 96))


# ---- ViT position-embedding controls --------------------------------------------------------------------------


def test_zeroing_the_position_embedding_keeps_the_class_position(built):
    keep, zero = built("timm:vit_tiny_patch16_224"), built("timm:vit_tiny_patch16_224", pos_embed="zero")
    pe0, pe1 = keep.extractor.model.pos_embed[0], zero.extractor.model.pos_embed[0]  # (1 + 16, 192)
    assert torch.equal(pe1[0], pe0[0]) and pe1[1:].abs().sum() == 0 and pe0[1:].abs().sum() > 0
    assert "zeroed at 16 patch positions, 1 prefix-token position(s) kept" in zero.pos_embed_note


def test_shuffling_permutes_patch_positions_with_the_seed(built):
    import copy

    from posprobe.backbones import set_pos_embed

    keep = built("timm:vit_tiny_patch16_224")
    shuffled = copy.deepcopy(keep.extractor)
    note = set_pos_embed(shuffled, "shuffle", 0, "vit")
    assert note == "position embedding permuted (seed 0) at 16 patch positions, 1 prefix-token position(s) kept"
    pe0, pe1 = keep.extractor.model.pos_embed[0], shuffled.model.pos_embed[0]
    assert torch.equal(pe1[0], pe0[0]) and not torch.equal(pe1[1:], pe0[1:])
    perm = [int((pe0[1:] == row).all(1).nonzero()) for row in pe1[1:]]  # every row is some original row
    assert sorted(perm) == list(range(16))
    assert perm == torch.randperm(16, generator=torch.Generator().manual_seed(0)).tolist()


def test_pos_embed_is_refused_without_a_learned_absolute_embedding(built):
    from posprobe.backbones import set_pos_embed

    with pytest.raises(PosprobeError, match="swin_tiny.* has none .*relative position bias"):
        swin = "timm:swin_tiny_patch4_window7_224"
        set_pos_embed(built(swin).extractor, "zero", 0, swin)
    with pytest.raises(PosprobeError, match="tv:resnet18 has none"):
        create_backbone("tv:resnet18", "random", pos_embed="shuffle")
    with pytest.raises(PosprobeError, match="unknown position-embedding control 'remove'"):
        create_backbone("timm:vit_tiny_patch16_224", "random", pos_embed="remove")
