"""The paper's figures drawn from a small hand-made StudyResult: no training, just what each figure shows."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from posprobe.data import SYNTHETIC, synthetic_images
from posprobe.studies import figures
from posprobe.studies.presets import PRESETS
from posprobe.studies.study import StudyPreset, StudyResult
from posprobe.targets import make_target

SIZE = 32


def fake_result(preset: StudyPreset, substituted: bool = False) -> StudyResult:
    """Predictions = target + a little noise for every (variant, pattern, test set) the preset names."""
    g = torch.Generator().manual_seed(0)
    test_sets = dict.fromkeys(("natural", *preset.test_sets))
    images = {t: ([f"photo{i}" for i in range(2)], torch.rand(2, 3, SIZE, SIZE, generator=g)) for t in test_sets}
    images.update({t: ([t], synthetic_images(t, SIZE)[0][None]) for t in test_sets if t in SYNTHETIC})
    patterns = dict.fromkeys((*preset.patterns, "H", "V", "G"))
    previews = {
        (preset.name, v.key, p, t): (make_target(p, SIZE, SIZE) + 0.2 * torch.rand(2, SIZE, SIZE, generator=g))
        for v in preset.variants
        for p in patterns
        for t in test_sets
    }
    backbones = {
        v.backbone_key: {"ran_as": "resnet18", "weights": "random", "substituted": substituted} for v in preset.variants
    }
    return StudyResult([], previews, images, backbones, {})


@pytest.fixture
def drawn(monkeypatch):
    """Calls figures.draw and returns the figure it built, as well as writing the PNG."""
    seen = {}
    grid = figures._grid
    monkeypatch.setattr(figures, "_grid", lambda *args, **kw: seen.setdefault("fig", grid(*args, **kw)))

    def draw(preset: StudyPreset, tmp_path, **kw):
        paths = figures.draw(fake_result(preset, **kw), preset, tmp_path)
        assert all(p.is_file() for p in paths)
        return seen["fig"]

    return draw


def test_content_loss_has_a_colour_bar_that_names_the_error_and_its_scale(drawn, tmp_path):
    fig = drawn(PRESETS["fig-content-loss"], tmp_path)
    bars = [ax for ax in fig.axes if ax.get_label() == "colour bar"]
    assert len(bars) == 1
    assert "|target - prediction|" in bars[0].get_ylabel()
    assert bars[0].get_ylim() == (0.0, figures.LOSS_VMAX)  # the bar's scale is the maps' scale


def test_padding_figure_has_the_papers_black_white_and_noise_rows(drawn, tmp_path):
    preset = PRESETS["fig-padding"]
    fig = drawn(preset, tmp_path)
    cols = 2 + len(preset.variants)  # input, target, one column per readout padding
    rows = [fig.axes[k].get_title() for k in range(0, len(fig.axes), cols)]
    assert rows == ["photo0", "photo1", "black", "white", "noise"]


def test_layer_curve_legend_marks_stand_ins(monkeypatch, tmp_path):
    from posprobe.output.plots import layer_curve_plot

    points = {
        "vgg16_hed": {"H": [(0.0, "relu1_2", 0.2), (1.0, "relu5_3", 0.7)]},
        "tv:resnet18": {"H": [(0.0, "relu", 0.1), (1.0, "layer4", 0.8)]},
    }
    fig = layer_curve_plot(tmp_path / "layer_curve.png", points, stand_ins={"vgg16_hed"})
    assert (tmp_path / "layer_curve.png").is_file()
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["vgg16_hed (stand-in)", "tv:resnet18"]


def test_importing_posprobe_leaves_the_matplotlib_backend_alone():
    code = (
        "import matplotlib; matplotlib.use('svg'); "
        "import posprobe, posprobe.cli, posprobe.studies.figures, posprobe.output.plots; "
        "print(matplotlib.get_backend())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "svg"
