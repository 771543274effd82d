"""The new commands and options through the console entry point (user errors: one stderr line, exit 2)."""

from __future__ import annotations

import json
import sys

import pytest

from posprobe import cli


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["posprobe", *args])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    out, err = capsys.readouterr()
    code = exit_info.value.code
    return (0 if code is None else code), out, err


def test_layers_lists_every_tappable_layer_with_defaults_marked(monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "layers", "timm:convnext_atto", "--image-size", "64")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["layer", "channels", "stride", "size", "also"]
    assert lines[1].split() == ["*", "stages.0", "40", "4", "16x16", "0"]
    assert "4 layers of timm:convnext_atto at 64x64" in out


def test_layers_of_a_torchvision_model_show_module_aliases(monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "layers", "tv:resnet18", "--image-size", "64")
    assert code == 0
    row = next(line for line in out.splitlines() if line.split()[:2] == ["*", "layer1.1.relu_1"])
    assert row.split()[2:] == ["64", "4", "16x16", "layer1", "layer1.1"]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["layers", "timm:convnxt_atto"], "Did you mean 'convnext_atto'?"),
        (["layers", "tv:resnet181"], "Did you mean 'resnet18'?"),
        (
            ["probe", "--out", "{tmp}/run", "--backbone", "tv:resnet18", "--weights", "random", "--layers", "layer5"],
            "unknown layer of tv:resnet18 'layer5'",
        ),
        (
            [
                "probe",
                "--out",
                "{tmp}/run",
                "--backbone",
                "timm:convnext_atto",
                "--weights",
                "random",
                "--backbone-padding",
                "valid",
                "--image-size",
                "64",
            ],
            "breaks a residual connection",
        ),
        (
            ["probe", "--out", "{tmp}/run", "--backbone", "tv:resnet18", "--weights", "random", "--pos-embed", "zero"],
            "needs a learned absolute position embedding",
        ),
        (
            ["layer-curve", "--out", "{tmp}/lc", "--backbone", "tv:resnet18", "--backbone-padding", "same"],
            "unknown backbone padding 'same'",
        ),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(monkeypatch, capsys, tmp_path, args, fragment):
    code, out, err = run_main(monkeypatch, capsys, *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert code == 2
    assert err.startswith("posprobe: error: ") and err.count("\n") == 1 and fragment in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_probe_with_layers_padding_and_input_norm_records_them(monkeypatch, capsys, tmp_path):
    code, out, err = run_main(
        monkeypatch,
        capsys,
        "probe",
        "--out",
        str(tmp_path / "run"),
        "--backbone",
        "tv:resnet18",
        "--weights",
        "random",
        "--layers",
        "relu,layer1",
        "--backbone-padding",
        "reflect",
        "--input-norm",
        "weights",
        "--image-size",
        "32",
        "--feat-size",
        "8",
        "--crops-per-photo",
        "1",
        "--epochs",
        "1",
        "--pattern",
        "H",
        "--synthetic",
        "none",
        "--quiet",
    )
    assert code == 0, err
    assert "backbone padding reflect: rewrote 5 conv(s), 1 pooling layer(s)" in out
    assert "level sizes at 32x32: relu 16x16, layer1 8x8" in out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["layers"] == ["relu", "layer1"] and config["backbone_padding"] == "reflect"
    resolved = config["resolved"]
    assert resolved["interpolation"] == "bilinear" and resolved["input_norm"] == "weights"
    assert resolved["backbone_padding"]["convs"] == 5 and resolved["level_shapes"] == [[64, 16, 16], [64, 8, 8]]
