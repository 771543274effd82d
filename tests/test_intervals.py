"""Bootstrap intervals and the paired direction test, against independent references (scipy, the normal
approximation) and hand-built cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from posprobe.intervals import bootstrap, step_direction, verdict


def test_one_seed_matches_scipys_percentile_bootstrap():
    x = torch.from_numpy(np.random.default_rng(0).normal(0.6, 0.2, 80))
    ours = bootstrap(x)
    ref = stats.bootstrap(
        (x.numpy(),), np.mean, confidence_level=0.95, method="percentile", n_resamples=4000, random_state=1
    ).confidence_interval
    assert ours.mean == pytest.approx(float(x.mean()))
    assert ours.lo == pytest.approx(ref.low, abs=0.01) and ours.hi == pytest.approx(ref.high, abs=0.01)


def test_the_interval_is_the_normal_one_for_many_images():
    x = torch.from_numpy(np.random.default_rng(1).normal(0.0, 1.0, 400))
    ours = bootstrap(x)
    half = 1.96 * float(x.std()) / math.sqrt(len(x))
    assert ours.hi - ours.lo == pytest.approx(2 * half, rel=0.1)


def test_seeds_widen_the_interval():
    """Three seeds that disagree by far more than the image spread: the two-way interval covers the seeds."""
    g = torch.Generator().manual_seed(2)
    per_seed = torch.tensor([[0.5], [0.7], [0.9]])
    grid = per_seed + 0.01 * torch.randn(3, 30, generator=g)
    images_only = bootstrap(grid.flatten())
    both = bootstrap(grid)
    assert both.hi - both.lo > 5 * (images_only.hi - images_only.lo)
    assert both.lo < 0.65 and both.hi > 0.75


def test_one_value_has_no_interval_and_the_same_values_the_same_interval():
    one = bootstrap(torch.tensor([0.3]))
    assert one.mean == pytest.approx(0.3) and math.isnan(one.lo) and math.isnan(one.hi)
    x = torch.rand(3, 10)
    assert bootstrap(x) == bootstrap(x.clone())
    assert not math.isnan(bootstrap(torch.rand(3, 1)).lo)  # a synthetic image with 3 seeds: over seeds


def test_steps_and_verdicts():
    base = torch.linspace(0, 1, 20)[None].expand(3, 20)
    assert step_direction(base, base + 0.1)[0] == "up"
    assert step_direction(base, base - 0.1)[0] == "down"
    g = torch.Generator().manual_seed(3)
    assert step_direction(base, base + 0.1 * torch.randn(3, 20, generator=g))[0] == "unresolved"
    assert verdict(["up", "up"]) == "reproduced"
    assert verdict(["up", "down"]) == "not reproduced"
    assert verdict(["up", "unresolved"]) == "inconclusive"
    assert verdict([]) == "inconclusive"
    with pytest.raises(ValueError, match="same seeds and images"):
        step_direction(torch.rand(2, 5), torch.rand(3, 5))
