"""ViT token position (measures/tokens.py, studies/token_run.py, ``posprobe tokens``): the acceptance on a random-weight
vit_tiny, hand-checkable probe / similarity / norm cases, the shuffle permutation, the cache path, the CLI."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from conftest import assert_one_line_error, invoke, save_image
from posprobe.backbones import create_backbone
from posprobe.data import synthetic_images
from posprobe.measures.tokens import (
    ImageSplit,
    TokenPositionProbe,
    cosine_similarity_map,
    extract_tokens,
    patch_pos_embed,
    position_chance,
    probe_position,
    split_images,
    token_layout,
    token_norms,
)

VIT = "timm:vit_tiny_patch16_224"
P = 196  # 14 x 14 patches at 224 px


@pytest.fixture(scope="module")
def vits():
    """The random-weight vit_tiny with each position-embedding control (same seed: the same weights)."""
    return {
        m: create_backbone(VIT, "random", 0, layers=("all",), pos_embed=m, image_size=224)
        for m in ("keep", "zero", "shuffle")
    }


@pytest.fixture(scope="module")
def content_free():
    """black, white, and 12 distinct noise images."""
    noise = torch.cat([synthetic_images("noise", 224, seed=k).images for k in range(12)])
    return {
        "black": synthetic_images("black", 224).images,
        "white": synthetic_images("white", 224).images,
        "noise": noise,
    }


def _embed_scores(backbone, images, groups):
    tokens = extract_tokens(backbone, images, 224, keep_blocks=False)
    split = split_images(groups, seed=0)
    return probe_position(tokens.embed, (14, 14), split, groups, "embed")


# ---- acceptance ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["black", "white"])
def test_embed_decodes_every_patch_with_the_embedding_kept(vits, content_free, kind):
    s = _embed_scores(vits["keep"], content_free[kind], [kind])
    assert s.index_top1.mean >= 0.99
    assert s.row_top1.mean >= 0.99 and s.col_top1.mean >= 0.99
    assert s.distance.mean < 0.05


def test_embed_decodes_held_out_photos_with_the_embedding_kept(vits):
    from posprobe.data import bundled_test_set

    photos = bundled_test_set(224)  # 12 photos: 7 train, 2 validation, 3 held out
    s = _embed_scores(vits["keep"], photos.images, list(photos.ids))
    assert s.n_test_images == 3
    assert s.index_top1.mean >= 0.99


@pytest.mark.parametrize("kind", ["black", "white", "noise"])
def test_embed_is_at_chance_with_the_embedding_zeroed(vits, content_free, kind):
    images = content_free[kind]
    groups = [f"{kind}{i}" for i in range(len(images))]
    s = _embed_scores(vits["zero"], images, groups)
    chance = position_chance((14, 14))
    if kind == "noise":  # held out: near chance
        assert s.index_top1.mean < 3 / P
        assert abs(s.distance.mean - chance["distance"]) < 0.5
    else:  # every token identical: every score ties, scored exactly at chance
        assert s.index_top1.mean == pytest.approx(1 / P, abs=1e-9)
        assert s.row_top1.mean == pytest.approx(1 / 14, abs=1e-9)
        assert s.distance.mean == pytest.approx(chance["distance"], abs=1e-6)


def test_shuffle_gives_the_permuted_decoding(vits, content_free):
    black = content_free["black"]
    keep = extract_tokens(vits["keep"], black, 224, keep_blocks=False).embed[0]  # (P, D)
    shuffled = extract_tokens(vits["shuffle"], black, 224, keep_blocks=False).embed[0]
    probe = TokenPositionProbe((14, 14), shrinkage=1e-3).fit(keep, torch.arange(P))
    perm = torch.randperm(P, generator=torch.Generator().manual_seed(0))  # pos_embed.set_pos_embed's, seed 0
    assert torch.equal(probe.predict(keep), torch.arange(P))
    assert torch.equal(probe.predict(shuffled), perm)  # patch j now carries patch perm[j]'s vector
    # a probe fitted on the shuffled tokens decodes the grid position as well as with the embedding kept
    assert _embed_scores(vits["shuffle"], black, ["black"]).index_top1.mean >= 0.99


# ---- hand-checkable cases -------------------------------------------------------------------------------------


def test_chance_levels():
    c = position_chance((2, 2))
    assert c["index_top1"] == 0.25 and c["row_top1"] == 0.5 and c["col_top1"] == 0.5
    assert c["distance"] == pytest.approx((2 + math.sqrt(2)) / 4)  # from each patch: 0, 1, 1, sqrt 2
    assert position_chance((1, 2))["distance"] == pytest.approx(0.5)


def test_one_hot_tokens_are_decoded_exactly():
    grid, n = (4, 4), 6
    tokens = torch.eye(16).repeat(n, 1, 1) + 0.01 * torch.randn(n, 16, 16, generator=torch.Generator().manual_seed(0))
    groups = [f"img{i}" for i in range(n)]
    s = probe_position(tokens, grid, split_images(groups, seed=1), groups)
    assert s.index_top1.mean == 1.0 and s.row_top1.mean == 1.0 and s.col_top1.mean == 1.0
    assert s.distance.mean == 0.0


def test_more_positions_than_dimensions_are_still_separated():
    """196 distinct position vectors in 16 dims: the nearest-mean rule separates every one, least squares on one-hot
    targets (a rank-17 fit to 196 classes) does not (92% here)."""
    gen = torch.Generator().manual_seed(0)
    pos = torch.randn(P, 16, generator=gen)
    train = pos + 0.01 * torch.randn(4, P, 16, generator=gen)  # (4 images, P, D)
    test = pos + 0.01 * torch.randn(2, P, 16, generator=gen)
    probe = TokenPositionProbe((14, 14)).fit(
        train[:3].reshape(-1, 16), torch.arange(P).repeat(3), train[3], torch.arange(P)
    )
    assert (probe.predict(test.reshape(-1, 16)) == torch.arange(P).repeat(2)).double().mean() == 1.0
    x = torch.cat([train.reshape(-1, 16), torch.ones(4 * P, 1)], 1).double()
    w = torch.linalg.lstsq(x, torch.eye(P).repeat(4, 1).double()).solution
    scores = torch.cat([test.reshape(-1, 16), torch.ones(2 * P, 1)], 1).double() @ w  # (2 * P, P)
    assert (scores.argmax(1) == torch.arange(P).repeat(2)).double().mean() < 0.99


def test_cosine_map_of_a_hand_made_embedding():
    pos = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-3.0, 0.0]])  # a 2 x 2 grid, row-major
    sim = cosine_similarity_map(pos, (2, 2))
    assert sim.shape == (2, 2, 2, 2)
    s = 1 / math.sqrt(2)
    expected = torch.tensor([[1, 0, s, -1], [0, 1, s, 0], [s, s, 1, -s], [-1, 0, -s, 1]])
    torch.testing.assert_close(sim.reshape(4, 4), expected, atol=1e-6, rtol=0)
    zeroed = cosine_similarity_map(torch.zeros(4, 2), (2, 2))  # --pos-embed zero: no direction
    assert torch.isnan(zeroed).all()


def test_prefix_tokens_are_reported_in_norms_but_never_probed(vits, content_free):
    backbone = vits["keep"]
    layout = token_layout(backbone, 224)
    assert layout.prefix == 1 and layout.prefix_names == ("cls",) and layout.grid == (14, 14)
    assert layout.rows[0] == "embed" and layout.rows[-1] == "blocks.11" and len(layout.rows) == 13
    tokens = extract_tokens(backbone, content_free["white"], 224, keep_blocks=True)
    assert tokens.embed.shape == (1, P, 192) and len(tokens.blocks) == 12 and tokens.blocks[0].shape == (1, P, 192)
    assert tokens.norms.shape == (1, 13, 1 + P)
    model = layout.model
    cls = (model.cls_token + model.pos_embed[:, :1]).detach().norm()  # the class token as block 0 receives it
    assert float(tokens.norms[0, 0, 0]) == pytest.approx(float(cls), rel=1e-5)
    torch.testing.assert_close(tokens.norms[0, 0, 1:], tokens.embed[0].norm(dim=-1))
    norms = token_norms(tokens.norms, layout)
    assert norms.patch.shape == (13, 14, 14) and norms.prefix.shape == (13, 1)
    peaks = norms.peaks()
    assert set(peaks[5]["prefix"]) == {"cls"} and len(peaks) == 13
    pe = patch_pos_embed(layout)
    torch.testing.assert_close(pe, model.pos_embed[0, 1:].detach())  # the class position dropped


def test_split_is_by_photo_and_refuses_too_few():
    groups = ["a", "a", "b", "b", "c", "d", "e", "f"]
    s = split_images(groups, seed=0)
    for part in (s.train, s.val, s.test):
        assert part
    for x, y in ((s.train, s.test), (s.train, s.val), (s.val, s.test)):
        assert not {groups[i] for i in x} & {groups[i] for i in y}
    assert split_images(["black"]) == ImageSplit((0,), (), (0,), held_out=False)
    with pytest.raises(Exception, match="at least 3 distinct photos"):
        split_images(["a", "a", "b"])


def test_cached_blocks_match_the_hooked_pass(tmp_path):
    from posprobe.data import TensorImages
    from posprobe.features.cache import FeatureCache
    from posprobe.studies.token_run import ImageSet, TokenConfig, _block_reader

    backbone = create_backbone(VIT, "random", 0, layers=("all",), image_size=64)
    layout = token_layout(backbone, 64)
    images = torch.cat([synthetic_images("noise", 64, seed=k).images for k in range(3)])

    image_set = ImageSet("noise", TensorImages(images, ["n0", "n1", "n2"], "noise"), ["n0", "n1", "n2"], "noise")
    config = TokenConfig(image_size=64, cache=True, cache_dir=str(tmp_path))
    read = _block_reader(backbone, image_set, layout, config, FeatureCache(tmp_path, log=None), progress=False)
    assert read is not None
    hooked = extract_tokens(backbone, images, 64, keep_blocks=True)
    for i in (0, 6, 11):
        torch.testing.assert_close(read(i), hooked.blocks[i], rtol=2e-3, atol=2e-3)  # float16 in the cache


# ---- the run and the CLI --------------------------------------------------------------------------------------


def test_cli_writes_the_run_directory(tmp_path):
    out = tmp_path / "run"
    code, stdout, stderr = invoke(
        "tokens", "--backbone", VIT, "--weights", "random", "--images", "black,noise", "--n-images", "6",
        "--image-size", "64", "--out", out, "--quiet", "--cache-dir", tmp_path / "cache",
    )  # fmt: skip
    assert code == 0, stderr
    names = {p.name for p in out.iterdir()}
    assert names >= {"config.json", "tokens.json", "tokens.csv", "environment.json", "report.md"}
    assert names >= {"token_position.png", "pos_embed_similarity.png", "token_norms.png"}
    rows = list(csv.DictReader((out / "tokens.csv").open()))
    assert len(rows) == 2 * 3 * 13  # image sets x modes x rows
    black_keep = [r for r in rows if (r["images"], r["mode"]) == ("black", "keep")]
    assert float(black_keep[0]["index_top1"]) == 1.0 and black_keep[0]["held_out"] == "False"
    assert float(rows[0]["chance_index_top1"]) == pytest.approx(1 / 16)  # 4 x 4 patches at 64 px
    data = json.loads((out / "tokens.json").read_text())
    assert data["grid"] == [4, 4] and data["prefix_tokens"] == ["cls"]
    assert data["pos_embed_similarity"]["mode"] == "keep" and len(data["pos_embed_similarity"]["matrix"]) == 16
    noise = next(p for p in data["probe"] if (p["images"], p["mode"]) == ("noise", "keep"))
    assert noise["rows"][0]["index_top1"]["lo"] is not None  # held out: an interval
    assert "blocks.11" in stdout and "embed" in stdout


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--backbone", "resnet18"], ["tokens need a vision transformer", "resnet18"]),
        (["--backbone", "timm:resnet18"], ["tokens need a vision transformer", "timm:resnet18"]),
        (["--backbone", "timm:no_such_vit"], ["unknown timm model", "no_such_vit"]),
        (["--images", "noise", "--n-images", "2"], ["at least 3 distinct photos", "given 2"]),
        (["--images", "sunsets"], ["'sunsets' is neither an image folder", "bundled, black, white, noise"]),
        (["--pos-embed", "keep,drop"], ["unknown --pos-embed mode 'drop'", "keep, zero, shuffle"]),
        (["--n-images", "0"], ["--n-images must be at least 1"]),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, args, fragments):
    base = {"--backbone": VIT, "--images": "black", "--image-size": "64"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = [a for kv in base.items() for a in kv]
    code, _, err = invoke("tokens", *argv, "--weights", "random", "--out", tmp_path / "run", "--quiet", "--no-cache")
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "run").exists()


def test_cli_refuses_an_empty_or_unreadable_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ("--backbone", VIT, "--weights", "random", "--out", tmp_path / "r")
    code, _, err = invoke("tokens", *args, "--images", empty)
    assert_one_line_error(code, err, "no images", "empty")
    few = tmp_path / "few"
    for i in range(2):
        save_image(few / f"{i}.png", torch.randint(0, 255, (20, 20, 3)).numpy())
    code, _, err = invoke(
        "tokens", "--backbone", VIT, "--weights", "random", "--images", few, "--image-size", "64",
        "--out", tmp_path / "r", "--no-cache",
    )  # fmt: skip
    assert_one_line_error(code, err, "at least 3 distinct photos", "given 2")
