"""Has a readout finished training? A rule on its training-loss curve, stated once and applied everywhere.

A readout that has not converged reads out less position than its features hold, so its score is not a
measurement of the features. Two failures are told apart from a converged readout:

- **still falling**: the mean loss over the last tenth of the updates is more than ``STILL_FALLING`` (5%)
  below the mean over the tenth before it: more updates would still lower it;
- **constant-map plateau**: the final loss (mean over the last tenth) is at least ``PLATEAU`` (90%) of the
  loss of the best constant map, the target's own variance: the readout draws (almost) a flat map, an
  optimisation failure rather than an absence of position (a readout on position-free features also lands
  there, which is why the flag is a warning to read, not an error);
- **diverged**: a non-finite loss.

Both windows lie after the lr decay of every profile (at two thirds), so the step size is the same in both.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

STILL_FALLING = 0.05
PLATEAU = 0.9
CURVE_POINTS = 100  # points of a stored loss curve (window means)

RULE = (f"a readout is flagged *still falling* when its mean training loss over the last tenth of the updates "
        f"is more than {STILL_FALLING:.0%} below the mean over the tenth before, *at a constant-map plateau* when "
        f"that final loss is at least {PLATEAU:.0%} of the loss of the best constant map (the target's variance), "
        "*diverged* when a loss is not finite")  # fmt: skip


@dataclass(frozen=True)
class Convergence:
    """The verdict on one readout's loss curve."""

    status: str  # converged | still falling | constant-map plateau | diverged | too short to tell
    final_loss: float  # mean over the last tenth of the updates
    late_drop: float  # relative fall from the tenth before the last to the last
    constant_loss: float  # MSE of the best constant map

    @property
    def ok(self) -> bool:
        return self.status == "converged"

    def to_dict(self) -> dict:
        return {"status": self.status, "final_loss": self.final_loss, "late_drop": self.late_drop,
                "constant_map_loss": self.constant_loss}  # fmt: skip

    def describe(self) -> str:
        return (f"{self.status} (final loss {self.final_loss:.4g}, best constant map {self.constant_loss:.4g}, "
                f"last tenth {-self.late_drop:+.1%})")


def constant_map_loss(target: torch.Tensor) -> float:
    """MSE of the best constant prediction of a fixed target: its variance over pixels."""
    return float(target.double().var(correction=0))


def check_convergence(losses: Sequence[float], target: torch.Tensor) -> Convergence:
    """Apply the rule (module docstring) to per-update training losses."""
    const = constant_map_loss(target)
    values = torch.tensor(list(losses), dtype=torch.float64)
    n = len(values)
    if n and not bool(torch.isfinite(values).all()):
        return Convergence("diverged", math.nan, math.nan, const)
    if n < 10:
        final = float(values.mean()) if n else math.nan
        return Convergence("too short to tell", final, math.nan, const)
    a, b = round(0.8 * n), round(0.9 * n)
    before, last = float(values[a:b].mean()), float(values[b:].mean())
    drop = (before - last) / max(last, 1e-12)
    if last >= PLATEAU * const:
        status = "constant-map plateau"
    elif drop > STILL_FALLING:
        status = "still falling"
    else:
        status = "converged"
    return Convergence(status, last, drop, const)


def loss_curve(losses: Sequence[float], points: int = CURVE_POINTS) -> list[tuple[int, float]]:
    """(last update of the window, mean loss over the window) for at most ``points`` equal windows."""
    values = torch.tensor(list(losses), dtype=torch.float64)
    n = len(values)
    if n == 0:
        return []
    edges = sorted({round(i * n / min(points, n)) for i in range(min(points, n) + 1)})
    return [(hi, float(values[lo:hi].mean())) for lo, hi in zip(edges, edges[1:])]
