"""SPC and MAE against scipy / numpy, including ties and constant predictions."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from posprobe.metrics import is_constant, mae, rankdata, spearman
from posprobe.targets import make_target


def scipy_spearman(pred: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """Per-image scipy.stats.spearmanr; target (H, W) shared or (B, H, W)."""
    p = pred.double().numpy().reshape(pred.shape[0], -1)
    t = target.double().numpy()
    t = np.broadcast_to(t.reshape(-1), p.shape) if t.ndim == pred.dim() - 1 else t.reshape(p.shape)
    return np.array([scipy.stats.spearmanr(a, b).statistic for a, b in zip(p, t)])


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_spearman_random_maps_shared_target(gen):
    pred = torch.rand(4, 13, 17, generator=gen)
    target = torch.rand(13, 17, generator=gen)
    np.testing.assert_allclose(spearman(pred, target).numpy(), scipy_spearman(pred, target), atol=1e-6)


def test_spearman_random_maps_per_image_target(gen):
    pred = torch.rand(3, 20, 9, generator=gen)
    target = torch.rand(3, 20, 9, generator=gen)
    np.testing.assert_allclose(spearman(pred, target).numpy(), scipy_spearman(pred, target), atol=1e-6)


def test_spearman_correlated_maps(gen):
    target = make_target("G", 24, 24)
    pred = target + 0.3 * torch.randn(5, 24, 24, generator=gen)
    got = spearman(pred, target)
    np.testing.assert_allclose(got.numpy(), scipy_spearman(pred, target), atol=1e-6)
    assert torch.all(got > 0.3)


def test_spearman_with_ties_in_prediction_and_target(gen):
    pred = torch.randint(0, 4, (6, 16, 16), generator=gen).float()  # heavy ties
    target = torch.randint(0, 3, (16, 16), generator=gen).float()
    np.testing.assert_allclose(spearman(pred, target).numpy(), scipy_spearman(pred, target), atol=1e-6)


def test_spearman_with_ties_against_paper_target(gen):
    """HS has repeated values within each row: every row is one tie group."""
    target = make_target("HS", 12, 12)
    pred = target + torch.randint(0, 3, (3, 12, 12), generator=gen).float() * 0.2
    np.testing.assert_allclose(spearman(pred, target).numpy(), scipy_spearman(pred, target), atol=1e-6)


def test_spearman_accepts_flat_maps(gen):
    pred, target = torch.rand(3, 50, generator=gen), torch.rand(50, generator=gen)
    np.testing.assert_allclose(spearman(pred, target).numpy(), scipy_spearman(pred, target), atol=1e-6)


def test_spearman_of_float64_input(gen):
    pred = torch.rand(2, 10, 10, generator=gen, dtype=torch.float64)
    target = torch.rand(10, 10, generator=gen, dtype=torch.float64)
    np.testing.assert_allclose(spearman(pred, target).numpy(), scipy_spearman(pred, target), atol=1e-6)


@pytest.mark.parametrize("pattern", ["H", "V", "G", "HS", "VS"])
def test_spearman_perfect_and_reversed(pattern):
    target = make_target(pattern, 20, 20)
    pred = torch.stack([target, 1 - target, 0.1 + 0.5 * target])
    assert spearman(pred, target).tolist() == pytest.approx([1.0, -1.0, 1.0], abs=1e-6)


def test_spearman_is_invariant_to_monotone_transform(gen):
    target = make_target("H", 16, 16)
    pred = torch.rand(2, 16, 16, generator=gen, dtype=torch.float64)
    np.testing.assert_allclose(spearman(torch.exp(3 * pred), target).numpy(), spearman(pred, target).numpy(), atol=1e-6)


def test_rankdata_matches_scipy_average_ranks(gen):
    x = torch.randint(0, 6, (4, 40), generator=gen).float()
    x[1] = torch.rand(40, generator=gen)  # a row without ties
    x[2] = 3.0  # a row that is one tie group
    got = rankdata(x)
    assert got.dtype == torch.float64
    expected = np.stack([scipy.stats.rankdata(row, method="average") for row in x.numpy()])
    np.testing.assert_array_equal(got.numpy(), expected)


def test_rankdata_with_negative_values_and_infinities():
    x = torch.tensor([[-1.0, float("inf"), -float("inf"), 0.0, -1.0, 2.5]])
    np.testing.assert_array_equal(rankdata(x).numpy()[0], scipy.stats.rankdata(x.numpy()[0]))


# ---- constant predictions ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.0, 0.5, 1.0, 123.0])
def test_constant_prediction_scores_exactly_zero(value):
    pred = torch.full((2, 16, 16), value)
    target = make_target("H", 16, 16)
    assert spearman(pred, target).tolist() == [0.0, 0.0]
    assert is_constant(pred).tolist() == [True, True]


def test_constant_plus_rounding_noise_counts_as_constant(gen):
    pred = (0.5 + 1e-8 * torch.randn(3, 32, 32, generator=gen)).float()
    target = make_target("H", 32, 32)
    assert is_constant(pred).all()
    assert torch.all(spearman(pred, target) == 0)


def test_bilinearly_upsampled_constant_counts_as_constant():
    """What a padding-free readout produces on a black image: a constant 26x26 map upsampled to 224."""
    small = torch.full((2, 1, 26, 26), 0.6180339)
    pred = F.interpolate(small, size=(224, 224), mode="bilinear", align_corners=False)[:, 0]
    target = make_target("G", 224, 224)
    assert is_constant(pred).all()
    assert torch.all(spearman(pred, target) == 0)


def test_small_real_variation_is_not_constant():
    target = make_target("H", 32, 32)
    pred = (0.5 + 1e-3 * target).expand(2, 32, 32)
    assert not is_constant(pred).any()
    assert spearman(pred, target).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


def test_is_constant_flags_only_the_constant_maps_of_a_batch(gen):
    pred = torch.rand(3, 8, 8, generator=gen)
    pred[1] = 0.25
    assert is_constant(pred).tolist() == [False, True, False]
    assert spearman(pred, make_target("V", 8, 8))[1].item() == 0.0


def test_constant_target_scores_zero_not_nan(gen):
    pred = torch.rand(2, 8, 8, generator=gen)
    out = spearman(pred, torch.zeros(8, 8))
    assert not torch.isnan(out).any() and torch.all(out == 0)


# ---- MAE ---------------------------------------------------------------------------------------------


def test_mae_shared_target(gen):
    pred = torch.rand(4, 11, 13, generator=gen)
    target = make_target("VS", 11, 13)
    expected = np.abs(pred.double().numpy() - target.double().numpy()[None]).mean(axis=(1, 2))
    np.testing.assert_allclose(mae(pred, target).numpy(), expected, rtol=1e-6)


def test_mae_per_image_target(gen):
    pred, target = torch.rand(3, 7, 5, generator=gen), torch.rand(3, 7, 5, generator=gen)
    expected = np.abs(pred.double().numpy() - target.double().numpy()).mean(axis=(1, 2))
    np.testing.assert_allclose(mae(pred, target).numpy(), expected, rtol=1e-6)


def test_mae_of_constant_half_against_h_is_the_papers_251():
    """The paper's PosENet H MAE .251 is a constant 0.5 against the 224-px ramp."""
    expected = np.abs(np.arange(224) / 223 - 0.5).mean()
    assert mae(torch.full((1, 224, 224), 0.5), make_target("H", 224, 224)).item() == pytest.approx(expected, abs=1e-6)
    assert round(expected, 3) == 0.251


def test_metrics_return_float32_per_image(gen):
    pred = torch.rand(5, 6, 6, generator=gen)
    for out in (spearman(pred, pred[0]), mae(pred, pred[0])):
        assert out.shape == (5,) and out.dtype == torch.float32


def test_metrics_ignore_autograd(gen):
    pred = torch.rand(2, 6, 6, generator=gen, requires_grad=True)
    assert not spearman(pred, torch.rand(6, 6)).requires_grad
    assert not mae(pred, torch.rand(6, 6)).requires_grad


@pytest.mark.parametrize(
    "pred_shape,target_shape",
    [((2, 8, 8), (8, 9)), ((2, 8, 8), (3, 8, 8)), ((2, 8, 8), (64,)), ((8,), (8,)), ((2, 8, 8), (2, 1, 8, 8))],
)
@pytest.mark.parametrize("metric", [spearman, mae])
def test_bad_shapes_raise(metric, pred_shape, target_shape):
    with pytest.raises(ValueError):
        metric(torch.rand(pred_shape), torch.rand(target_shape))
