"""The engine every command trains and scores through: cells, seeds, levels, scores against scipy."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import spearmanr

from posprobe.backbones import create_backbone
from posprobe.data import TensorImages
from posprobe.errors import PosprobeError
from posprobe.features.encode import encode
from posprobe.readouts.engine import Cell, ReadoutSetting, level_channels, score_cells, train_cells
from posprobe.readouts.joint import predict_source
from posprobe.readouts.train import TrainConfig
from posprobe.targets import make_target

SIZE, FEAT = 32, 8
CONFIG = TrainConfig(steps=12, epochs=1, batch_size=4)


@pytest.fixture(scope="module")
def setup():
    backbone = create_backbone("resnet18", "random", seed=0)
    g = torch.Generator().manual_seed(0)
    train = encode(
        backbone,
        TensorImages(torch.rand(8, 3, SIZE, SIZE, generator=g), [f"t{i}" for i in range(8)], "train"),
        FEAT,
        progress=False,
    )
    test = encode(
        backbone,
        TensorImages(torch.rand(5, 3, SIZE, SIZE, generator=g), [f"s{i}" for i in range(5)], "test"),
        FEAT,
        progress=False,
    )
    targets = {p: make_target(p, SIZE, SIZE) for p in ("H", "G")}
    return backbone, train, test, targets


def train(setup, cells):
    backbone, features, _, targets = setup
    return train_cells(features, cells, targets, backbone, CONFIG, FEAT, SIZE, progress=False)


def test_a_cell_trains_the_same_alone_or_beside_others(setup):
    one = Cell(ReadoutSetting(kernel_size=3, padding=1), "H", seed=1)
    others = [
        Cell(ReadoutSetting(kernel_size=1), "G", seed=1),
        Cell(ReadoutSetting(levels=("layer2",)), "G", 1),
        Cell(ReadoutSetting(kernel_size=3, padding=1), "H", seed=2),
    ]
    alone, together = train(setup, [one])[one], train(setup, [one, *others])[one]
    for (name, x), y in zip(alone.readout.state_dict().items(), together.readout.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)  # fused passes: rounding only
    assert alone.schedule.updates == together.schedule.updates == 12 and len(alone.losses) == 12


def test_seeds_draw_different_readouts_and_the_same_seed_the_same(setup):
    a, b = Cell(ReadoutSetting(), "H", 0), Cell(ReadoutSetting(), "H", 1)
    first, again = train(setup, [a, b]), train(setup, [a])
    weight = lambda t: t.readout.state_dict()["head.0.weight"]  # noqa: E731
    assert not torch.allclose(weight(first[a]), weight(first[b]))
    torch.testing.assert_close(weight(first[a]), weight(again[a]), rtol=1e-4, atol=1e-5)


def test_a_level_cell_reads_only_that_levels_channels(setup):
    backbone = setup[0]
    cell = Cell(ReadoutSetting(levels=("layer2",)), "G", 0)
    done = train(setup, [cell])[cell]
    start = sum(lv.channels for lv in backbone.levels[: [lv.name for lv in backbone.levels].index("layer2")])
    assert torch.equal(done.channels, torch.arange(start, start + 128))
    assert done.readout.in_channels == 128
    with pytest.raises(PosprobeError, match="has no level 'layer9'"):
        level_channels(backbone, ("layer9",))


def test_scores_are_scipys_spearman_of_the_predictions(setup):
    _, _, test, targets = setup
    cells = [Cell(ReadoutSetting(), "H", 0), Cell(ReadoutSetting(kernel_size=1), "G", 0)]
    trained = train(setup, cells)
    scores = score_cells(trained, test, targets, n_preview=2)
    for cell in cells:
        pred = predict_source({"m": trained[cell].readout}, test, channels={"m": trained[cell].channels})["m"]
        target = targets[cell.target].flatten().numpy()
        expected = [spearmanr(p.flatten().numpy(), target).statistic for p in pred]
        torch.testing.assert_close(
            scores[cell].spc.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6
        )
        assert scores[cell].ids == test.ids and scores[cell].first_maps.shape == (2, SIZE, SIZE)
