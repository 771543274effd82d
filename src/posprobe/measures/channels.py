"""Which channels of a level carry position: per-channel scores from several rankers, and channel ablation.

Every ranker gives each channel of one level a score (higher: more position) from training images only, so an
ablation scored on held-out images is not selected on them:

- ``linear``: the weight norm of the exact linear probe per channel, ||w_c|| over its k x k taps times the
  channel's root mean square (so rescaling a channel does not change its score), root-sum-square over the target
  patterns: how much the best linear readout leans on the channel;
- ``pvf``: the channel's own unbiased position-variance fraction V_pos_u(c) / V_tot(c) (position_variance.py):
  the share of its variance common to every image at each location, no readout;
- ``flip``: Islam et al. 2021's flip test, mean_n |GAP_c(f(x_n)) - GAP_c(f(flip x_n))| / std_c: a channel of a
  flip-equivariant network pools to the same value for an image and its mirror, so a difference means the
  channel responds to where content sits (std_c: the channel's standard deviation over images and locations);
- ``border``: |log(border / interior)| of the channel's mean absolute activation in the outermost ring of cells
  vs the rest (padding-aware neurons, Garcia-Gasulla et al. 2023): channels that fire (or fall silent) at the
  image border.

``ablate`` zeroes the chosen channels or replaces each by its mean over the training images and locations (a
constant: no spatial structure left, but the input level the readout was trained with).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import PosprobeError, unknown_choice

RANKERS: tuple[str, ...] = ("linear", "pvf", "flip", "border")
ABLATIONS: tuple[str, ...] = ("zero", "mean")
DEFINITIONS = {
    "linear": "sqrt(sum_p (||w_p,c|| rms_c)^2): the exact linear probe's weights on channel c over its k x k taps, "
    "times the channel's root mean square over the training images, root-sum-square over the patterns",
    "pvf": "V_pos_u(c) / V_tot(c): the channel's unbiased position-variance fraction on the training images",
    "flip": "mean_n |GAP_c(f(x_n)) - GAP_c(f(flip x_n))| / std_c, flips left-right and top-bottom averaged, on the "
    "training images; std_c the channel's standard deviation over images and locations",
    "border": "|log(B_c / I_c)|, B_c and I_c the channel's mean absolute activation in the outermost ring of cells "
    "and inside it, on the training images",
}
_CHUNK = 1 << 25  # bytes of float64 per chunk of channels


@dataclass
class ChannelRanking:
    """One ranker's score of every channel of a level (NaN: no score, e.g. a dead channel; ranked last)."""

    ranker: str
    level: str
    scores: np.ndarray  # (C,)

    @property
    def order(self) -> np.ndarray:
        """Channel indices from the most position to the least; NaN last, ties by index (a stable order)."""
        s = np.where(np.isnan(self.scores), -np.inf, self.scores)
        return np.argsort(-s, kind="stable")

    def top(self, k: int) -> np.ndarray:
        return self.order[:k]

    def to_dict(self) -> dict:
        order = self.order
        return {
            "ranker": self.ranker,
            "level": self.level,
            "definition": DEFINITIONS[self.ranker],
            "order": order.tolist(),
            "scores": [None if not math.isfinite(v) else float(v) for v in self.scores],
        }


def _channel_chunks(features: torch.Tensor, scale: float):
    """(N, C, h, w) in chunks of channels as float64 (N, k, h*w), values times ``scale``, with the first index."""
    n, c, h, w = features.shape
    step = max(1, _CHUNK // max(1, n * h * w * 8))
    for c0 in range(0, c, step):
        chunk = features[:, c0 : c0 + step].to(torch.float64, memory_format=torch.contiguous_format, copy=True)
        yield c0, chunk.mul_(scale).reshape(n, -1, h * w)  # (N, k, h, w) -> (N, k, L)


def channel_moments(features: torch.Tensor, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Each channel's mean and standard deviation over images and locations, (C,) float64 each."""
    c = features.shape[1]
    mean, std = torch.empty(c, dtype=torch.float64), torch.empty(c, dtype=torch.float64)
    for c0, x in _channel_chunks(features, scale):
        k = x.shape[1]
        mean[c0 : c0 + k] = x.mean((0, 2))
        std[c0 : c0 + k] = x.transpose(0, 1).reshape(k, -1).std(1, correction=0)
    return mean, std


def linear_weight_scores(weights: Mapping[str, torch.Tensor], rms: torch.Tensor) -> np.ndarray:
    """``weights``: pattern -> the linear probe's conv weight (1, C, k, k) or (C, k, k); ``rms`` (C,): each
    channel's root mean square in the features the probe read. Returns (C,) (module doc)."""
    if not weights:
        raise PosprobeError("the linear ranker needs the weights of at least one fitted pattern")
    total = torch.zeros(rms.shape[0], dtype=torch.float64)
    for w in weights.values():
        w = w.detach().double().reshape(-1, *w.shape[-3:])[0]  # (C, k, k)
        if w.shape[0] != rms.shape[0]:
            raise PosprobeError(f"the probe reads {w.shape[0]} channels but {rms.shape[0]} have an rms")
        total += (torch.linalg.vector_norm(w.reshape(w.shape[0], -1), dim=1) * rms.double()).pow(2)
    return total.sqrt().numpy()


def flip_scores(
    plain: torch.Tensor, flipped: Sequence[torch.Tensor], std: torch.Tensor, scale: float = 1.0
) -> np.ndarray:
    """``plain`` (N, C, h, w) and one or more flipped sets (the same images mirrored, in the same order);
    ``std`` (C,) the channel's spread: mean_n |GAP(plain) - GAP(flipped)| / std, averaged over the flips."""
    gap = _pooled(plain, scale)  # (N, C)
    diffs = []
    for f in flipped:
        if f.shape != plain.shape:
            raise PosprobeError(f"flipped features {tuple(f.shape)} do not match the images' {tuple(plain.shape)}")
        diffs.append((gap - _pooled(f, scale)).abs().mean(0))
    score = torch.stack(diffs).mean(0)
    return torch.where(std > 0, score / std.clamp_min(1e-300), torch.full_like(score, math.nan)).numpy()


def _pooled(features: torch.Tensor, scale: float) -> torch.Tensor:
    """Global average pooling, (N, C, h, w) -> (N, C) float64."""
    out = torch.empty(features.shape[:2], dtype=torch.float64)
    for c0, x in _channel_chunks(features, scale):
        out[:, c0 : c0 + x.shape[1]] = x.mean(2)
    return out


def border_scores(features: torch.Tensor, scale: float = 1.0, width: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(|log ratio|, ratio) per channel: mean |activation| in the outer ring of ``width`` cells / inside it.

    A channel silent everywhere has ratio NaN; silent inside only, +inf (ranked first)."""
    n, c, h, w = features.shape
    if min(h, w) <= 2 * width:
        raise PosprobeError(f"a {h}x{w} map has no interior inside a border ring {width} cell(s) wide")
    ring = torch.ones(h, w, dtype=torch.bool)
    ring[width : h - width, width : w - width] = False
    ring = ring.flatten()
    border, inner = torch.empty(c, dtype=torch.float64), torch.empty(c, dtype=torch.float64)
    for c0, x in _channel_chunks(features, scale):
        a = x.abs()
        border[c0 : c0 + x.shape[1]] = a[:, :, ring].mean((0, 2))
        inner[c0 : c0 + x.shape[1]] = a[:, :, ~ring].mean((0, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = border.numpy() / inner.numpy()
    ratio[(border.numpy() == 0) & (inner.numpy() == 0)] = math.nan
    with np.errstate(divide="ignore"):
        score = np.abs(np.log(ratio))
    return score, ratio


def check_ablation(mode: str) -> str:
    if mode not in ABLATIONS:
        raise unknown_choice("ablation", mode, ABLATIONS)
    return mode


def ablate(
    features: torch.Tensor, channels: Sequence[int] | np.ndarray, mode: str, means: torch.Tensor
) -> torch.Tensor:
    """A copy of ``features`` (N, C, h, w) with ``channels`` set to 0 (``zero``) or to their mean over the
    training images and locations ``means`` (C,) (``mean``)."""
    check_ablation(mode)
    out = features.clone()
    idx = torch.as_tensor(np.asarray(channels, dtype=np.int64))
    if len(idx):
        fill = torch.zeros(len(idx)) if mode == "zero" else means[idx].float()
        out[:, idx] = fill.to(out.dtype)[None, :, None, None]
    return out


def random_draws(channels: int, k: int, draws: int, seed: int = 0) -> list[np.ndarray]:
    """``draws`` sets of ``k`` distinct channels, each drawn uniformly, seeded by (seed, k): the same for every
    ranker, so each ranker's top-k is compared with the same random draws."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + k)
    return [torch.randperm(channels, generator=gen)[:k].numpy() for _ in range(draws)]
