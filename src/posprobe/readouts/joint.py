"""Joint training: every readout that reads the same features trains in one pass over them.

The batch order comes from ``TrainConfig.seed`` alone and each readout keeps its own parameters, optimiser
and schedule, so a readout trained with others ends where it ends trained alone, up to float rounding (a
fused convolution sums in another order, on some CPUs with another kernel). Three exact rewrites make the
shared pass cheap, none of which changes what is minimised:

- Readouts whose first layer is a single-output convolution of the same geometry on the same channels
  (every pattern of a Table 1 column) run as one convolution with one output channel per readout.
- Levels the alignment upsampled are convolved at their native size, as a 1x1 convolution to Q*k*k maps
  plus small shift-and-upsample products; parts stored aligned take the same form (``conv_parts``).
- The loss, the MSE between the bilinearly upsampled map ``U m`` and the target ``y`` at full resolution,
  is computed from the small map: ``|U m - y|^2 = m.(M m) - 2 m.(U^T y) + |y|^2`` with ``M = U^T U``
  separable (``MapLoss``), in float64. Predictions are still upsampled as the readout does it.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import PosprobeError
from ..features.parts import FeatureBatch, interp_matrix
from ..features.sources import as_source
from .pem import UpsampledHead
from .train import ReadoutJob, TrainConfig


class MapLoss:
    """MSE between a readout's upsampled map and a fixed target, evaluated on the (s, s) map.

    ``U = U_h (x) U_w`` is bilinear upsampling (align_corners=False) from (s_h, s_w) to the target's (H, W);
    ``M = U^T U`` and ``U^T y`` are precomputed, so the loss of a (b, s_h, s_w) batch costs a few
    (s x s) matrix products instead of an (H, W) upsampling and its backward pass.
    """

    def __init__(self, target: torch.Tensor, map_size: tuple[int, int]):
        big_h, big_w = target.shape[-2:]
        uh = interp_matrix(big_h, map_size[0], False).to(target.device)  # (H, s_h)
        uw = interp_matrix(big_w, map_size[1], False).to(target.device)  # (W, s_w)
        y = target.double()
        self.bh, self.bw = uh.T @ uh, uw.T @ uw  # (s_h, s_h), (s_w, s_w)
        self.z = uh.T @ y @ uw  # U^T y as an (s_h, s_w) map
        self.yy = float((y * y).sum())
        self.pixels = big_h * big_w

    def per_image(self, m: torch.Tensor) -> torch.Tensor:
        """(b, s_h, s_w) maps -> (b,) float64 full-resolution MSE of each upsampled map."""
        m = m.double()
        quad = (m * (self.bh @ m @ self.bw)).sum((-2, -1))
        return (quad - 2 * (m * self.z).sum((-2, -1)) + self.yy) / self.pixels

    def __call__(self, m: torch.Tensor) -> torch.Tensor:
        return self.per_image(m).mean()


LOSS_CHECK_EVERY = 50  # updates between checks for a non-finite loss off the CPU (one host sync each)
PREDICT_CHUNK = 5  # readouts per pass in predict_each: one Table 1 column's patterns
MAX_TAP_OUTPUTS = 16  # conv_parts: parts stored aligned take the 1x1 form up to this many outputs
MIN_TAP_CHANNELS = 64  # ... and from this many channels (below, its upsampling products cost more than the conv)


@functools.lru_cache(maxsize=64)
def _tap_matrix(fs: int, n: int, k: int, padding: int) -> torch.Tensor:
    """(k * n, s) float32: stacked rows of the align_corners=True upsampling n -> fs, zero-padded by
    ``padding`` and cropped for each kernel offset d: block d is ``A_pad[d : d + s].T``."""
    a = torch.zeros(fs + 2 * padding, n, dtype=torch.float64)
    a[padding : padding + fs] = interp_matrix(fs, n, True)
    s = fs + 2 * padding - k + 1
    return torch.cat([a[d : d + s].T for d in range(k)]).float()  # rows (d, native index)


def conv_parts(batch: FeatureBatch, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
    """conv2d(batch.aligned(), weight, bias, padding=padding) computed part by part: (b, Q, s, s).

    A part f (b, c, h, w) stands for the aligned map ``A_h f A_w^T`` (``A`` the align_corners=True resize
    to fs; the identity for a part stored aligned), so kernel tap (dy, dx) contributes
    ``A_h[dy : dy + s] (W[:, :, dy, dx] . f) A_w[dx : dx + s]^T``: a 1x1 convolution to Q*k*k maps at the
    part's size, then two small matrix products that upsample, shift and sum them at once. A part stored
    aligned takes the same form while Q is a few readouts (measured 20-35% faster than F.conv2d's forward and
    backward with 3-5 outputs, kernels 3-5, on 2 cores: too few outputs to fill a direct convolution's
    kernels); with many outputs (the linear probe's sketches) the Q*k*k maps would cost memory for nothing,
    so it is F.conv2d there.
    """
    q, _, kh, kw = weight.shape
    y = None
    for part in batch.parts:
        x, w = part.values(), weight[:, part.lo : part.hi]
        if not part.native and (q > MAX_TAP_OUTPUTS or x.shape[1] < MIN_TAP_CHANNELS):
            t = F.conv2d(x, w, None, padding=padding)
        else:
            b, c, h, wd = x.shape
            taps = w.permute(0, 2, 3, 1).reshape(q * kh * kw, c, 1, 1)  # rows (q, dy, dx)
            low = F.conv2d(x, taps).view(b, q, kh, kw, h, wd)  # (b, q, dy, dx, h, w)
            th = _tap_matrix(batch.feat_size, h, kh, padding).to(low.device)  # (kh*h, s)
            tw = _tap_matrix(batch.feat_size, wd, kw, padding).to(low.device)  # (kw*w, s)
            cols = low.permute(0, 1, 2, 4, 3, 5).reshape(b, q, kh * h, kw * wd) @ tw  # (b, q, (dy, h), s)
            t = th.T @ cols  # (b, q, s, s)
        y = t if y is None else y + t
    if bias is not None:
        y = y + bias.view(1, q, 1, 1)
    return y


def _fusable_conv(readout: nn.Module) -> nn.Conv2d | None:
    """The readout's first layer when it is a plain single-output convolution (what fusion needs)."""
    head = getattr(readout, "head", None)
    if not isinstance(head, nn.Sequential) or not _known(readout):
        return None
    conv = head[0]
    ok = (
        isinstance(conv, nn.Conv2d)
        and conv.out_channels == 1
        and conv.groups == 1
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)
        and conv.padding[0] == conv.padding[1]
        and conv.kernel_size[0] == conv.kernel_size[1]
    )
    return conv if ok else None


def _known(readout: nn.Module) -> bool:
    """Readouts whose ``forward_aligned`` is ``upsample(head(x))`` (so the loss may use the small map)."""
    return isinstance(readout, UpsampledHead)


@dataclass
class _Group:
    """Jobs whose first convolutions run as one (same kernel, padding and input channels)."""

    members: list[int]
    channels: torch.Tensor | None
    padding: int


def plan_groups(jobs: Sequence) -> tuple[list[_Group], list[int]]:
    """Fusable jobs grouped by (kernel, padding, bias, channels); the rest are trained one by one."""
    groups: dict[tuple, _Group] = {}
    single: list[int] = []
    for j, job in enumerate(jobs):
        conv = _fusable_conv(job.readout)
        if conv is None:
            single.append(j)
            continue
        channels = job.channels  # a ReadoutJob, or a _Reader when predicting
        key = (
            conv.kernel_size,
            conv.padding,
            conv.bias is not None,
            None if channels is None else tuple(int(c) for c in channels),
        )
        groups.setdefault(key, _Group([], channels, conv.padding[0])).members.append(j)
    return list(groups.values()), single


class _JobLoss:
    """The per-batch loss of one job, the way its readout type allows."""

    def __init__(self, job):
        self.job = job
        r = job.readout
        self.small = _known(r)
        if self.small:
            side = readout_side(r)
            self.map_loss = MapLoss(job.target, (side, side))

    def from_map(self, m: torch.Tensor) -> torch.Tensor:
        """m: (b, s, s) output of the readout's head -> scalar loss."""
        return self.map_loss(m)

    def from_batch(self, batch: FeatureBatch) -> torch.Tensor:
        x = batch.select(getattr(self.job, "channels", None)).aligned()
        r = self.job.readout
        if self.small:
            return self.from_map(r.head(x)[:, 0])
        pred = r.forward_aligned(x)[:, 0]  # (b, S, S)
        return F.mse_loss(pred, self.job.target.expand_as(pred))


def readout_side(readout: nn.Module) -> int:
    """Side of the readout's map before upsampling."""
    side = readout.feat_size
    for m in readout.head:
        if isinstance(m, nn.Conv2d):
            side = side + 2 * m.padding[0] - m.kernel_size[0] + 1
    return side


def group_maps(group: _Group, readouts: Sequence[nn.Module], batch: FeatureBatch) -> list[torch.Tensor]:
    """The head output (b, 1, s, s) of each member of ``group``, its first convolutions run as one."""
    convs = [readouts[j].head[0] for j in group.members]
    weight = convs[0].weight if len(convs) == 1 else torch.cat([c.weight for c in convs])  # (Q, C, k, k)
    y = conv_parts(batch.select(group.channels), weight, None, group.padding)  # (b, Q, s, s)
    out = []
    for q, j in enumerate(group.members):
        # each readout's map as a fresh standard-layout tensor with its own bias added: the bias gradient and
        # BatchNorm then reduce over the same tensor whether the readout is fused with others or alone
        m = y[:, q : q + 1].clone(memory_format=torch.contiguous_format)
        if convs[q].bias is not None:
            m = m + convs[q].bias.view(1, 1, 1, 1)
        rest = readouts[j].head[1:]
        out.append(rest(m) if len(rest) else m)
    return out


def _group_losses(group: _Group, jobs: Sequence, losses: Sequence[_JobLoss], batch: FeatureBatch) -> list[torch.Tensor]:
    maps = group_maps(group, [job.readout for job in jobs], batch)
    return [losses[j].from_map(m[:, 0]) for j, m in zip(group.members, maps)]


def train_readouts(
    features,
    jobs: Sequence[ReadoutJob],
    config: TrainConfig,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> Sequence[ReadoutJob]:
    """Train every job's readout for ``config.schedule(len(features))`` updates over ``features`` (aligned
    features (N, C, fs, fs), an ``EncodedSet`` or a feature source: a cache entry, or a ``StreamedSet`` that
    re-runs the encoder every pass), cycling the set with a fresh shuffle each pass. All jobs train in the same
    passes: fused first convolutions, loss on the small map (rewrites that change float rounding only).

    Fills each job's per-update training loss (``job.losses``) and schedule; readouts end in eval mode.
    """
    source = as_source(features)
    n = len(source)
    schedule = config.schedule(n)
    opts, scheds = [], []
    for job in jobs:
        job.readout.to(device).train()
        job.target = job.target.to(device)
        opt = torch.optim.SGD(
            job.readout.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        opts.append(opt)
        scheds.append(torch.optim.lr_scheduler.MultiStepLR(opt, list(schedule.milestones), config.lr_gamma))
    groups, single = plan_groups(jobs)
    losses = [_JobLoss(job) for job in jobs]
    curves = torch.zeros(len(jobs), schedule.updates, dtype=torch.float64, device=device)  # synced once, at the end
    gen = torch.Generator().manual_seed(config.seed)
    bar = tqdm(
        total=schedule.updates,
        desc=f"train {len(jobs)} readout(s)",
        unit="update",
        disable=None if progress else True,
        leave=False,
    )
    step = checked = 0
    # a non-finite loss stops training: on the CPU every update (no sync to wait for), elsewhere every
    # LOSS_CHECK_EVERY updates and at the end, so the accelerator is never made to wait on each update
    check_every = 1 if torch.device(device).type == "cpu" else LOSS_CHECK_EVERY
    while step < schedule.updates:  # one pass over the training set, stopped part-way at the last update
        order = torch.randperm(n, generator=gen) if config.shuffle else torch.arange(n)
        order = order[: (schedule.updates - step) * config.batch_size]
        for _, batch in source.batches(order, config.batch_size, device):
            batch_losses: dict[int, torch.Tensor] = {}
            for group in groups:
                batch_losses.update(zip(group.members, _group_losses(group, jobs, losses, batch)))
            for j in single:
                batch_losses[j] = losses[j].from_batch(batch)
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            stacked = torch.stack([batch_losses[j].double() for j in range(len(jobs))])  # (jobs,)
            stacked.sum().backward()
            for opt, sched in zip(opts, scheds):
                opt.step()
                sched.step()
            curves[:, step] = stacked.detach()
            step += 1
            bar.update(1)
            if step - checked >= check_every or step == schedule.updates:
                _check_losses(curves, checked, step, jobs, config, schedule.updates, bar)
                checked = step
    bar.close()
    for job, curve in zip(jobs, curves.cpu().tolist()):
        job.losses = curve
        job.schedule = schedule
        job.readout.eval()
    return jobs


def _check_losses(curves: torch.Tensor, lo: int, hi: int, jobs: Sequence, config, updates: int, bar) -> None:
    """Stop training with one line at the first update in [lo, hi) whose loss is not finite: a diverged readout
    draws NaN maps, and a NaN map must never be scored (NaN != NaN would rank it as a plausible SPC near 0)."""
    window = curves[:, lo:hi]
    if bool(torch.isfinite(window).all()):
        return
    bar.close()
    bad = ~torch.isfinite(window).cpu()
    col = int(bad.any(0).nonzero()[0, 0])
    j = int(bad[:, col].nonzero()[0, 0])
    value = float(window[j, col])
    others = int(bad.any(1).sum()) - 1
    also = f" ({others} other readout(s) too)" if others else ""
    raise PosprobeError(
        f"readout {jobs[j].describe()} diverged: its training loss became {value} at update {lo + col + 1} of "
        f"{updates}{also}; lower the learning rate (--lr, now {config.lr:g}), nothing was scored"
    )


@dataclass
class _Reader:
    """A readout to predict with and the channels it reads (what ``plan_groups`` groups)."""

    readout: nn.Module
    channels: torch.Tensor | None


@torch.inference_mode()
def predict_source(
    readouts: Mapping[str, nn.Module],
    features,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    channels: Mapping[str, torch.Tensor | None] | None = None,
    labels: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """(N, S, S) maps of every eval-mode readout, in one pass over ``features`` (any source).

    Readouts that training would fuse are evaluated the same way (one convolution, native-size levels). The
    maps are N * S * S * 4 bytes per readout (850 images at 224: 170 MB): predict a few readouts per call.
    A map with a NaN or an infinity raises one line naming the readout (``labels``, else its key) and the
    first such image: it would have no score, and must never get a plausible one.
    """
    source = as_source(features)
    keys = list(readouts)
    readers = [_Reader(readouts[k].to(device).eval(), (channels or {}).get(k)) for k in keys]
    groups, single = plan_groups(readers)
    out: list[torch.Tensor | None] = [None] * len(keys)  # (N, S, S) each, filled batch by batch

    def put(j: int, at: int, maps: torch.Tensor) -> None:
        if out[j] is None:
            out[j] = torch.empty(len(source), *maps.shape[-2:])
        out[j][at : at + len(maps)] = maps[:, 0]

    at = 0
    for _, batch in source.batches(torch.arange(len(source)), batch_size, device):
        for group in groups:
            for j, m in zip(group.members, group_maps(group, [r.readout for r in readers], batch)):
                r = readers[j].readout
                put(j, at, F.interpolate(m, size=(r.out_size, r.out_size), mode="bilinear", align_corners=False))
        for j in single:
            put(j, at, readers[j].readout.forward_aligned(batch.select(readers[j].channels).aligned()))
        at += len(batch)
    ids = getattr(features, "ids", None)
    for k, maps in zip(keys, out):
        check_predictions(maps, (labels or {}).get(k, k), ids)
    return dict(zip(keys, out))


def check_predictions(maps: torch.Tensor | None, readout, ids: Sequence[str] | None = None) -> None:
    """Raise one line when ``maps`` (N, S, S) of ``readout`` hold a NaN or an infinity, naming the first image."""
    if maps is None:
        return
    finite = torch.isfinite(maps.flatten(1)).all(1)
    if bool(finite.all()):
        return
    rows = (~finite).nonzero().flatten().tolist()
    first = ids[rows[0]] if ids is not None and rows[0] < len(ids) else f"#{rows[0]}"
    name = " / ".join(map(str, readout)) if isinstance(readout, tuple) else str(readout)
    raise PosprobeError(
        f"readout {name} predicts non-finite maps for {len(rows)} of {len(maps)} image(s) (first: {first}); "
        "its weights or the features diverged, so there is nothing to score"
    )


def predict_each(
    readouts: Mapping,
    features,
    device: str | torch.device = "cpu",
    channels: Mapping | None = None,
    labels: Mapping | None = None,
) -> Iterator[tuple[object, torch.Tensor]]:
    """(key, (N, S, S) maps) for every readout, ``PREDICT_CHUNK`` readouts per pass over ``features``: only one
    pass's maps are in memory at a time (35 readouts' maps of PASCAL-S's 850 images would be 6 GB)."""
    keys = list(readouts)
    for i in range(0, len(keys), PREDICT_CHUNK):
        chunk = keys[i : i + PREDICT_CHUNK]
        yield from predict_source(
            {k: readouts[k] for k in chunk},
            features,
            device=device,
            channels={k: (channels or {}).get(k) for k in chunk},
            labels={k: (labels or {}).get(k, k) for k in chunk},
        ).items()
