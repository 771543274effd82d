"""The layer curve: every tapped level probed on its own (and all together), for several backbones and
paddings on one figure. One tiny end-to-end run (32-px bundled photos, one epoch) and the parsing rules."""

from __future__ import annotations

import json

import pytest

from posprobe.errors import PosprobeError
from posprobe.readouts.train import get_profile
from posprobe.studies.layer_curve import LayerCurveConfig, curves_of, parse_entry, run_layer_curve, write_layer_curve


def test_entries_take_their_own_layers_or_the_shared_ones():
    assert parse_entry("tv:resnet18@layer1, layer3", None) == ("tv:resnet18", ("layer1", "layer3"))
    assert parse_entry("timm:convnext_atto", ("0", "2")) == ("timm:convnext_atto", ("0", "2"))
    with pytest.raises(PosprobeError, match="names no backbone"):
        parse_entry("@layer1", None)


def test_curves_are_backbones_times_settings_with_unique_labels():
    config = LayerCurveConfig(backbones=("tv:resnet18", "vgg16@relu1_2"), paddings=("zeros", "valid"))
    labels = [c.label for c in curves_of(config)]
    assert labels == [
        "tv:resnet18 (padding zeros)",
        "tv:resnet18 (padding valid)",
        "vgg16@relu1_2 (padding zeros)",
        "vgg16@relu1_2 (padding valid)",
    ]
    with pytest.raises(PosprobeError, match="twice"):
        curves_of(LayerCurveConfig(backbones=("vgg16", "vgg16")))
    with pytest.raises(PosprobeError, match="unknown backbone padding 'none'"):
        curves_of(LayerCurveConfig(paddings=("none",)))
    with pytest.raises(PosprobeError, match="unknown position-embedding control"):
        curves_of(LayerCurveConfig(pos_embeds=("off",)))


@pytest.mark.slow
def test_tiny_layer_curve_scores_every_level_and_writes_its_run(tmp_path):
    config = LayerCurveConfig(
        backbones=("tv:resnet18@relu,layer1",),
        weights="random",
        paddings=("zeros", "circular"),
        patterns=("H",),
        image_size=32,
        feat_size=8,
        crops_per_photo=1,
        train=get_profile("quick", epochs=1),
        profile="quick",
    )
    curve = run_layer_curve(config, progress=False)
    assert [(r["curve"], r["level"]) for r in curve.rows] == [
        (c, lv)
        for c in ("tv:resnet18@relu,layer1 (padding zeros)", "tv:resnet18@relu,layer1 (padding circular)")
        for lv in ("relu", "layer1", "all")
    ]
    first = curve.rows[0]
    assert first["depth"] == 0.0 and first["stride"] == 2 and first["size"] == "16x16" and first["n"] == 12
    assert curve.rows[1]["depth"] == 1.0 and curve.rows[2]["channels"] == 128
    assert all(-1.0 <= r["spc_mean"] <= 1.0 for r in curve.rows)
    # every level beside the pixel control (one PosENet readout, shared) and its score on the rolled photos
    assert len({r["spc_pixels"] for r in curve.rows}) == 1
    for r in curve.rows:
        assert r["selectivity"] == pytest.approx(r["spc_mean"] - r["spc_pixels"], abs=1e-6)
        assert r["content_share"] == pytest.approx(r["spc_mean"] - r["spc_rolled"], abs=1e-6)
        assert r["selectivity_lo"] <= r["selectivity"] <= r["selectivity_hi"]
    # and its readout-free position-variance fraction, with an interval per level
    relu = next(r for r in curve.rows if r["level"] == "relu")
    assert relu["pvf_lo"] <= relu["pvf"] <= relu["pvf_hi"] and relu["pvf_measured_at"] == "aligned 8x8 (native 16x16)"
    out = write_layer_curve(curve, tmp_path / "run")
    assert {p.name for p in out.iterdir()} == {
        "config.json",
        "layer_curve.csv",
        "layer_curve.png",
        "position_variance.png",
        "metrics.json",
        "environment.json",
    }
    saved = json.loads((out / "config.json").read_text())
    circular = saved["resolved"]["tv:resnet18@relu,layer1 (padding circular)"]
    assert circular["backbone_padding"]["mode"] == "circular" and circular["level_shapes"] == [[64, 16, 16], [64, 8, 8]]
    assert (out / "layer_curve.png").stat().st_size > 10_000


def test_the_recorded_config_names_the_cache_folder_actually_used(monkeypatch, tmp_path):
    monkeypatch.setenv("POSPROBE_CACHE", str(tmp_path / "env-cache"))
    assert LayerCurveConfig(cache=True).to_dict()["cache_dir"] == str(tmp_path / "env-cache")
    assert LayerCurveConfig(cache=True, cache_dir="/x").to_dict()["cache_dir"] == "/x"
    assert LayerCurveConfig(cache=False).to_dict()["cache_dir"] is None
