"""The convergence rule on hand-built loss curves, and on real training."""

from __future__ import annotations

import math

import pytest

from posprobe.readouts.convergence import check_convergence, constant_map_loss, loss_curve
from posprobe.targets import make_target

G = make_target("G", 32, 32)


def test_the_best_constant_maps_loss_is_the_targets_variance():
    t = make_target("H", 5, 5)  # columns 0, .25, .5, .75, 1
    assert constant_map_loss(t) == pytest.approx(float(((t - t.mean()) ** 2).mean()))
    assert constant_map_loss(t) == pytest.approx(0.125)


def test_a_flat_low_curve_has_converged():
    losses = [0.1 * math.exp(-i / 20) + 0.001 for i in range(1000)]
    c = check_convergence(losses, G)
    assert c.finished and not c.flat and c.status == "converged" and c.final_loss == pytest.approx(0.001, rel=0.01)


def test_a_curve_still_falling_at_the_end_is_flagged():
    losses = [0.05 * (1 - i / 1000) + 1e-4 for i in range(1000)]  # linear to the very end
    c = check_convergence(losses, G)
    assert c.status == "still falling" and not c.finished


def test_a_curve_at_the_best_constant_maps_loss_draws_a_flat_map():
    losses = [constant_map_loss(G) * 0.97] * 500
    c = check_convergence(losses, G)
    assert c.status == "flat map" and c.flat and c.finished


def test_non_finite_and_short_curves():
    assert check_convergence([0.1] * 20 + [math.nan], G).status == "diverged"
    assert not check_convergence([0.1, 0.05], G).finished


def test_loss_curve_averages_windows():
    curve = loss_curve(list(range(10)), points=5)
    assert curve == [(2, 0.5), (4, 2.5), (6, 4.5), (8, 6.5), (10, 8.5)]
    assert len(loss_curve([0.1] * 4950)) == 100
    assert loss_curve([]) == []
