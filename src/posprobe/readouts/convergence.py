"""Has a readout finished training? A rule on its training-loss curve, stated once and applied everywhere.

A readout that has not finished training reads out less position than its features hold, so its score is
not a measurement of the features. The rule:

- **still falling**: the mean loss over the last tenth of the updates is more than ``STILL_FALLING`` (5%)
  below the mean over the tenth before it: more updates would still lower it. Not finished.
- **diverged**: a non-finite loss. Not finished. (``joint.train_readouts`` stops training at the first one with an
  error, so a readout it trained never reaches scoring with this verdict; the rule still judges any curve.)
- **flat map**: finished, but the final loss (mean over the last tenth) is at least ``PLATEAU`` (90%) of the
  loss of the best constant map, the target's own variance: the readout draws (almost) a constant map.
  Either the features carry no position it can read (what a control such as PosENet without padding should
  do) or its training collapsed early (the authors' lr 0.1 does that to some wide readouts); the loss
  curves tell which. Flagged, never hidden, but a measurement like any other.
- **converged** otherwise.

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

RULE = (
    f"a readout has not finished training when its mean training loss over the last tenth of the updates is "
    f"more than {STILL_FALLING:.0%} below the mean over the tenth before (*still falling*) or a loss is not finite "
    f"(*diverged*); a finished readout draws a *flat map* when that final loss is at least {PLATEAU:.0%} of the "
    "loss of the best constant map (the target's variance): no position it can read, as a control should, or a "
    "training collapse (see its loss curve)"
)


@dataclass(frozen=True)
class Convergence:
    """The verdict on one readout's loss curve."""

    status: str  # converged | flat map | still falling | diverged | too short to tell
    final_loss: float  # mean over the last tenth of the updates
    late_drop: float  # fall from the tenth before the last to the last, relative to the former
    constant_loss: float  # MSE of the best constant map

    @property
    def finished(self) -> bool:
        """Training ran to its end: the score measures the features (a flat map included)."""
        return self.status in ("converged", "flat map")

    @property
    def flat(self) -> bool:
        return self.status == "flat map"

    def to_dict(self) -> dict:
        return {
            "status": self.status,
            "final_loss": self.final_loss,
            "late_drop": self.late_drop,
            "constant_map_loss": self.constant_loss,
        }

    def describe(self) -> str:
        return (
            f"{self.status} (final loss {self.final_loss:.4g}, best constant map {self.constant_loss:.4g}, "
            f"last tenth {-self.late_drop:+.1%})"
        )


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
    drop = (before - last) / max(before, 1e-12)
    if drop > STILL_FALLING:
        status = "still falling"
    elif last >= PLATEAU * const:
        status = "flat map"
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
