"""Feature sources: where a readout's input batches come from, in a given image order.

Training and prediction only ever need one batch of aligned features at a time, so they read them from a
*source*: an in-memory or memory-mapped feature tensor (``MemorySource``, what an ``EncodedSet`` or a cache
entry holds), or the encoder itself, re-run on every pass (``StreamedSet``: constant memory in the number
of images, for sets too large to cache).

A batch is a ``FeatureBatch`` of channel *parts*. A level that the alignment upsampled (native side below
``feat_size``: VGG16's relu5_3, ResNet's layer3 and layer4) is exactly ``A f A^T`` for its native map ``f``
and the fixed bilinear matrix ``A``, so it is kept at its native size; the readout's convolution over it is
computed there (``joint.conv_parts``), which is the same linear map at a fraction of the cost.
"""
from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from .errors import PosprobeError
from .features import _Indexed, unreadable_list

Shape = tuple[int, int, int]  # (channels, height, width) of one tapped level at its native size


@functools.lru_cache(maxsize=64)
def interp_matrix(n_out: int, n_in: int, align_corners: bool) -> torch.Tensor:
    """(n_out, n_in) float64 matrix of 1-D linear interpolation as F.interpolate does it.

    Bilinear resizing is separable: resizing an (h, w) map to (H, W) is ``A_h @ map @ A_w.T``.
    """
    eye = torch.eye(n_in, dtype=torch.float64).view(n_in, 1, n_in)  # n_in unit signals of length n_in
    out = F.interpolate(eye, size=n_out, mode="linear", align_corners=align_corners)  # (n_in, 1, n_out)
    return out[:, 0].T.contiguous()


@functools.lru_cache(maxsize=64)
def _recovery_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_in, n_out) float32 left inverse of the align_corners=True upsampling n_in -> n_out."""
    return torch.linalg.pinv(interp_matrix(n_out, n_in, True)).float()


@dataclass(frozen=True)
class PartPlan:
    """Channels [lo, hi) of the aligned features; ``native`` = (h, w) when kept at the level's own size."""

    lo: int
    hi: int
    native: tuple[int, int] | None


def plan_parts(levels: Sequence[Shape] | None, channels: int, feat_size: int) -> list[PartPlan]:
    """Merge consecutive levels that are stored aligned into one part; keep strongly upsampled ones native.

    A level is kept native when its map has at most half the aligned map's pixels (below that the
    convolution at native size plus its upsampling costs more than the direct one).
    """
    if not levels or sum(c for c, _, _ in levels) != channels:
        return [PartPlan(0, channels, None)]
    plans: list[PartPlan] = []
    lo = 0
    for c, h, w in levels:
        native = (h, w) if h * w * 2 <= feat_size * feat_size else None
        if native is None and plans and plans[-1].native is None and plans[-1].hi == lo:
            plans[-1] = PartPlan(plans[-1].lo, lo + c, None)
        else:
            plans.append(PartPlan(lo, lo + c, native))
        lo += c
    return plans


@dataclass
class Part:
    """One block of channels of a batch: (b, hi-lo, fs, fs) aligned, or (b, hi-lo, h, w) native."""

    lo: int
    hi: int
    data: torch.Tensor
    native: bool


class FeatureBatch:
    """One batch of readout inputs as channel parts; ``aligned()`` gives the (b, C, fs, fs) tensor."""

    def __init__(self, parts: list[Part], feat_size: int):
        self.parts, self.feat_size = parts, feat_size
        self.channels = parts[-1].hi if parts else 0
        self._aligned: torch.Tensor | None = None
        self._selected: dict[tuple[int, ...], FeatureBatch] = {}

    def __len__(self) -> int:
        return self.parts[0].data.shape[0]

    def aligned(self) -> torch.Tensor:
        """(b, C, fs, fs) float32, channels_last: exactly what ``Readout.forward_aligned`` consumes."""
        if self._aligned is None:
            fs = self.feat_size
            blocks = [
                F.interpolate(p.data, size=(fs, fs), mode="bilinear", align_corners=True) if p.native else p.data
                for p in self.parts
            ]
            x = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
            self._aligned = x.contiguous(memory_format=torch.channels_last)
        return self._aligned

    def select(self, channels: torch.Tensor | None) -> "FeatureBatch":
        """The batch restricted to ``channels`` (indices into the aligned channels, in that order)."""
        if channels is None:
            return self
        key = tuple(int(c) for c in channels)
        if key not in self._selected:
            parts: list[Part] = []
            for c in key:
                if not 0 <= c < self.channels:
                    raise PosprobeError(f"channel {c} is outside the features' {self.channels} channels")
            i = 0
            while i < len(key):  # runs of consecutive channels inside one part become one part
                part = next(p for p in self.parts if p.lo <= key[i] < p.hi)
                j = i + 1
                while j < len(key) and key[j] == key[j - 1] + 1 and key[j] < part.hi:
                    j += 1
                a, b = key[i] - part.lo, key[j - 1] + 1 - part.lo
                data = part.data if (a, b) == (0, part.hi - part.lo) else part.data[:, a:b]
                lo = parts[-1].hi if parts else 0
                parts.append(Part(lo, lo + (b - a), data.contiguous(memory_format=torch.channels_last), part.native))
                i = j
            self._selected[key] = FeatureBatch(parts, self.feat_size)
        return self._selected[key]


def _recover_native(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(b, c, fs, fs) aligned channels of an upsampled level -> (b, c, h, w) native maps (least squares).

    The result is channels_last float32; two matrix products on the (b, fs, fs * c) layout, no big copies.
    """
    b, c, fs_h, fs_w = x.shape
    ph, pw = _recovery_matrix(h, fs_h).to(x.device), _recovery_matrix(w, fs_w).to(x.device)
    nhwc = x.permute(0, 2, 3, 1).float().contiguous()  # (b, fs, fs, c)
    rows = torch.matmul(ph, nhwc.view(b, fs_h, fs_w * c))  # (b, h, fs * c)
    f = torch.matmul(pw, rows.view(b * h, fs_w, c))  # (b * h, w, c)
    return f.view(b, h, w, c).permute(0, 3, 1, 2)  # (b, c, h, w), channels_last strides


def _part_shape(plan: PartPlan, n: int, feat_size: int) -> tuple[int, int, int, int]:
    h, w = plan.native if plan.native else (feat_size, feat_size)
    return n, plan.hi - plan.lo, h, w


def _fill(out: list[torch.Tensor], x: torch.Tensor, plans: list[PartPlan], at: int = 0) -> None:
    """Write aligned features x (b, C, fs, fs) into the parts ``out`` at rows [at, at + b)."""
    for dst, p in zip(out, plans):
        block = x if (p.lo, p.hi) == (0, x.shape[1]) else x[:, p.lo : p.hi]
        rows = dst[at : at + x.shape[0]]
        rows.copy_(_recover_native(block, *p.native) if p.native else block)  # converts dtype and layout


def _split(x: torch.Tensor, plans: list[PartPlan]) -> list[Part]:
    """Aligned (b, C, fs, fs) -> parts: float32 channels_last blocks, upsampled levels back at native size."""
    out = [torch.empty(_part_shape(p, x.shape[0], x.shape[-1]), device=x.device).contiguous(
        memory_format=torch.channels_last) for p in plans]  # fmt: skip
    _fill(out, x, plans)
    return [Part(p.lo, p.hi, t, p.native is not None) for p, t in zip(plans, out)]


def memory_budget_bytes(fraction: float = 0.4) -> int:
    """How much RAM a training run may use to hold float32 features: a fraction of what is available.

    POSPROBE_TRAIN_RAM_GB overrides it.
    """
    if os.environ.get("POSPROBE_TRAIN_RAM_GB"):
        return int(float(os.environ["POSPROBE_TRAIN_RAM_GB"]) * (1 << 30))
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return int(fraction * info.get("MemAvailable", info["MemTotal"]))
    except (OSError, KeyError, ValueError, IndexError):
        return 4 << 30


class MemorySource:
    """Batches of a feature tensor (N, C, fs, fs) that is in memory or memory-mapped (float16 or float32).

    When the float32 working copy fits ``budget_bytes`` it is made once (upsampled levels recovered at
    native size); otherwise every batch is converted as it is read, so a memory-mapped cache entry larger
    than RAM is never loaded whole.
    """

    def __init__(self, features: torch.Tensor, levels: Sequence[Shape] | None = None, budget_bytes: int | None = None):
        if features.dim() != 4:
            raise PosprobeError(f"features must be (N, C, fs, fs); got shape {tuple(features.shape)}")
        self.features = features
        self.feat_size = features.shape[-1]
        self.channels = features.shape[1]
        self.plans = plan_parts(levels, self.channels, self.feat_size)
        self.budget_bytes = memory_budget_bytes() if budget_bytes is None else budget_bytes
        self._whole: list[Part] | None = None

    def __len__(self) -> int:
        return self.features.shape[0]

    def working_bytes(self) -> int:
        """Bytes of the float32 working copy (native parts at their own size)."""
        per_image = sum((p.hi - p.lo) * (math.prod(p.native) if p.native else self.feat_size**2) for p in self.plans)
        return 4 * per_image * len(self)

    def _whole_parts(self, device: torch.device) -> list[Part] | None:
        budget = self.budget_bytes
        if device.type == "cuda":  # the working copy lives on the GPU: it must fit there too
            free, _ = torch.cuda.mem_get_info(device)
            budget = min(budget, int(0.5 * free))
        if self._whole is None and self.working_bytes() <= budget:
            x = self.features
            if all(p.native is None for p in self.plans) and x.dtype == torch.float32 and x.device == device \
                    and x.is_contiguous(memory_format=torch.channels_last):  # fmt: skip
                self._whole = [Part(0, self.channels, x, False)]  # already the working layout: no copy
            else:
                out = [torch.empty(_part_shape(p, len(self), self.feat_size), device=device).contiguous(
                    memory_format=torch.channels_last) for p in self.plans]  # fmt: skip
                for i in range(0, len(self), 64):
                    _fill(out, x[i : i + 64].to(device), self.plans, i)
                self._whole = [Part(p.lo, p.hi, t, p.native is not None) for p, t in zip(self.plans, out)]
        return self._whole

    def batches(self, order: torch.Tensor, batch_size: int, device: str | torch.device = "cpu"
                ) -> Iterator[tuple[torch.Tensor, FeatureBatch]]:  # fmt: skip
        """(indices, batch) for consecutive slices of ``order``.

        From the working copy, a batch is gathered into buffers reused from batch to batch (a fresh
        allocation of this size costs more in page faults than the copy): use a batch before taking the next.
        """
        device = torch.device(device)
        whole = self._whole_parts(device)
        buffers: list[torch.Tensor] = []
        if whole is not None:
            buffers = [torch.empty(min(batch_size, len(order)), *p.data.shape[2:], p.data.shape[1],
                                   dtype=p.data.dtype, device=device) for p in whole]  # (b, h, w, c) each
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            if whole is not None:
                parts = []
                for p, buf in zip(whole, buffers):
                    rows = p.data.permute(0, 2, 3, 1).reshape(p.data.shape[0], -1)  # NHWC rows: a view
                    out = buf[: len(idx)]
                    torch.index_select(rows, 0, idx.to(device), out=out.view(len(idx), -1))
                    parts.append(Part(p.lo, p.hi, out.permute(0, 3, 1, 2), p.native))  # channels_last view
            else:
                parts = _split(self.features[idx].to(device), self.plans)
            yield idx, FeatureBatch(parts, self.feat_size)


def _as_list(batch: list) -> list:
    return batch


def _keep(batch: list[tuple[int, torch.Tensor | None]]) -> tuple[list[int], torch.Tensor | None]:
    good = [(i, x) for i, x in batch if x is not None]
    return [i for i, _ in good], (torch.stack([x for _, x in good]) if good else None)


class _Readable(Dataset):
    """Decodes an image only to say whether it can be read (the first pass of a streamed set)."""

    def __init__(self, images: Dataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[int, bool]:
        return i, self.images[i] is not None


class StreamedSet:
    """An image set whose aligned features are recomputed by the frozen encoder on every pass.

    Memory does not grow with the number of images: only one batch of images and features is alive at a
    time. The images that cannot be decoded are found once, up front, so every epoch sees the same set
    and the batch order is the one an in-memory set of the same images would get.
    """

    def __init__(self, backbone, images: Dataset, feat_size: int = 28, device: str | torch.device = "cpu",
                 strict: bool = False, num_workers: int | None = None, encode_batch_size: int = 16):  # fmt: skip
        from .features import default_workers

        self.backbone, self.images, self.feat_size = backbone, images, feat_size
        self.device = torch.device(device)
        self.name = getattr(images, "name", "images")
        self.description = getattr(images, "description", "")
        all_ids = list(getattr(images, "ids", [str(i) for i in range(len(images))]))
        self.num_workers = default_workers(images) if num_workers is None else num_workers
        self.encode_batch_size = encode_batch_size
        if hasattr(images, "paths"):  # files may be unreadable: find them once
            loader = DataLoader(_Readable(images), batch_size=64, num_workers=self.num_workers,
                                collate_fn=_as_list)  # fmt: skip
            flags = [ok for batch in loader for _, ok in batch]
        else:
            flags = [True] * len(images)
        bad = [all_ids[i] for i, ok in enumerate(flags) if not ok]
        if bad and strict:
            raise PosprobeError(f"unreadable image in {self.name}: {bad[0]} (--strict stops at the first)")
        self.kept = [i for i, ok in enumerate(flags) if ok]
        if not self.kept:
            raise PosprobeError(f"none of the {len(images)} image(s) in {self.name} could be read: "
                                + unreadable_list(bad, images))  # fmt: skip
        self.ids, self.skipped = [all_ids[i] for i in self.kept], bad
        first = images[self.kept[0]]
        self.levels: list[Shape] = [tuple(s) for s in backbone.level_shapes(first.shape[-1])]
        self.channels = sum(c for c, _, _ in self.levels)
        self.plans = plan_parts(self.levels, self.channels, feat_size)

    def __len__(self) -> int:
        return len(self.kept)

    def _parts(self, levels: list[torch.Tensor]) -> list[Part]:
        fs = self.feat_size
        parts = []
        for plan in self.plans:
            group, c = [], plan.lo
            while c < plan.hi:
                f = levels.pop(0)
                group.append(f)
                c += f.shape[1]
            if plan.native is not None:
                data = group[0].float()
            else:
                resized = [F.interpolate(f, size=(fs, fs), mode="bilinear", align_corners=True) for f in group]
                data = resized[0] if len(resized) == 1 else torch.cat(resized, dim=1)
            parts.append(Part(plan.lo, plan.hi, data.float().contiguous(memory_format=torch.channels_last),
                              plan.native is not None))  # fmt: skip
        return parts

    def batches(self, order: torch.Tensor, batch_size: int, device: str | torch.device | None = None
                ) -> Iterator[tuple[torch.Tensor, FeatureBatch]]:  # fmt: skip
        """Encode the images of ``order`` in consecutive batches and yield (indices, features)."""
        device = self.device if device is None else torch.device(device)
        backbone = self.backbone.to(device).eval()
        if device.type == "cpu":
            backbone = backbone.to(memory_format=torch.channels_last)
        subset = Subset(_Indexed(self.images), [self.kept[int(i)] for i in order])
        workers = self.num_workers if len(subset) > batch_size else 0
        loader = DataLoader(subset, batch_size=batch_size, num_workers=workers, collate_fn=_keep)
        start = 0
        for got, x in loader:
            idx = order[start : start + len(got)]
            start += len(got)
            if x is None or len(got) != len(idx):
                raise PosprobeError(f"an image of {self.name} became unreadable while streaming it")
            x = x.to(device)
            if device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():  # not inference_mode: the readout's autograd saves these tensors
                levels = list(backbone(x))
            yield idx, FeatureBatch(self._parts(levels), self.feat_size)

    def encoded(self, limit: int | None = None):
        """The first ``limit`` images' aligned features in memory, as an ``EncodedSet`` (for previews)."""
        from .features import EncodedSet

        n = len(self) if limit is None else min(limit, len(self))
        chunks = [b.aligned().cpu() for _, b in self.batches(torch.arange(n), self.encode_batch_size)]
        return EncodedSet(self.name, torch.cat(chunks), self.ids[:n], self.skipped, self.description,
                          levels=tuple(self.levels))  # fmt: skip


FeatureSource = MemorySource | StreamedSet


def as_source(features, budget_bytes: int | None = None) -> FeatureSource:
    """A tensor, an ``EncodedSet`` or a source -> a source."""
    if isinstance(features, (MemorySource, StreamedSet)):
        return features
    if isinstance(features, torch.Tensor):
        return MemorySource(features, None, budget_bytes)
    if hasattr(features, "features"):  # an EncodedSet
        return MemorySource(features.features, getattr(features, "levels", None), budget_bytes)
    raise TypeError(f"not a feature source: {type(features).__name__}")

