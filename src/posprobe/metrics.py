"""Per-image scores of a predicted map against its target, batched in torch.

SPC is Spearman's rank correlation over all pixels with ties given their average rank (as
``scipy.stats.spearmanr``). A prediction that is constant (up to float rounding) carries no rank
information: its SPC is defined as 0, as the paper prints ".0" for black/white inputs to PosENet,
and ``is_constant`` lets callers count such maps.

A map with a NaN or an infinity is no prediction at all: its SPC and MAE are NaN, never a number that could
pass for a score. ``scipy.stats.spearmanr`` gives NaN for a NaN too (NaN != NaN would otherwise give every NaN
its own rank and a plausible SPC near 0); for an infinity it ranks it last and returns a number, where a map
that overflowed is refused here as well.
"""

from __future__ import annotations

import torch


def _flatten(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.dim() < 2:
        raise ValueError(f"pred must be (B, H, W) or (B, N); got shape {tuple(pred.shape)}")
    b = pred.shape[0]
    p = pred.reshape(b, -1)  # (B, N)
    if target.shape == pred.shape[1:]:
        t = target.reshape(1, -1).expand(b, -1)  # one target for every image
    elif target.shape == pred.shape:
        t = target.reshape(b, -1)
    else:
        raise ValueError(f"target shape {tuple(target.shape)} matches neither pred {tuple(pred.shape)} nor its maps")
    return p, t


def _finite_rows(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """(B,) bool: rows of the flattened prediction and target without a NaN or an infinity."""
    return torch.isfinite(p).all(1) & torch.isfinite(t).all(1)


def is_constant(pred: torch.Tensor) -> torch.Tensor:
    """(B,) bool: maps whose spread is within float rounding of their magnitude."""
    p = pred.reshape(pred.shape[0], -1)
    spread = p.amax(1) - p.amin(1)
    scale = p.abs().amax(1).clamp(min=1.0)
    # a few ulps: bilinear upsampling of a constant map, for one, is exact only up to rounding
    tol = 16 * torch.finfo(p.dtype if p.is_floating_point() else torch.float32).eps
    return spread <= tol * scale


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (1-based, ties averaged) along the last dim of a (B, N) tensor, as float64."""
    b, n = x.shape
    sorted_x, order = torch.sort(x, dim=1)
    new_group = torch.ones_like(sorted_x, dtype=torch.bool)
    new_group[:, 1:] = sorted_x[:, 1:] != sorted_x[:, :-1]
    group = torch.cumsum(new_group.long(), dim=1) - 1  # (B, N) tie-group index in sorted order
    positions = torch.arange(1, n + 1, dtype=torch.float64, device=x.device).expand(b, n)
    sums = torch.zeros(b, n, dtype=torch.float64, device=x.device).scatter_add_(1, group, positions)
    counts = torch.zeros(b, n, dtype=torch.float64, device=x.device).scatter_add_(1, group, torch.ones_like(positions))
    avg_sorted = torch.gather(sums / counts.clamp(min=1), 1, group)  # (B, N) rank of each sorted entry
    ranks = torch.empty_like(avg_sorted)
    ranks.scatter_(1, order, avg_sorted)
    return ranks


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    denom = torch.sqrt((a * a).sum(1) * (b * b).sum(1))
    return torch.where(denom > 0, (a * b).sum(1) / denom.clamp(min=1e-300), torch.zeros_like(denom))


def spearman(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) Spearman correlation of each predicted map with the target; 0 for constant maps, NaN for a map
    (or target) with a NaN or an infinity.

    pred: (B, H, W); target: (H, W), shared by the batch, or (B, H, W).
    """
    p, t = _flatten(pred.detach(), target.detach().to(pred.device))
    shared = target.shape == pred.shape[1:]  # one target for the batch: rank it once
    t_ranks = rankdata(t[:1]).expand_as(t) if shared and t.shape[0] > 0 else rankdata(t)
    rho = _pearson(rankdata(p), t_ranks).to(torch.float32)
    rho = torch.where(is_constant(p), torch.zeros_like(rho), rho)
    return torch.where(_finite_rows(p, t), rho, torch.full_like(rho, float("nan")))


def mae(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B,) mean absolute difference between each predicted map and the target; NaN for a non-finite map."""
    p, t = _flatten(pred.detach(), target.detach().to(pred.device))
    err = (p.double() - t.double()).abs().mean(1).to(torch.float32)
    return torch.where(_finite_rows(p, t), err, torch.full_like(err, float("nan")))  # inf: NaN as well
