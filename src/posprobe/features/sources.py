"""Feature sources: where a readout's input batches come from, in a given image order.

Training and prediction only ever need one batch of features at a time, so they read them from a
*source*: the parts of an ``EncodedSet`` in memory or memory-mapped from the cache (``MemorySource``), or
the encoder itself, re-run on every pass (``StreamedSet``: constant memory in the number of images, for
sets too large to cache). A batch is a ``parts.FeatureBatch`` of float32 channel parts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..backbones.registry import NonFiniteFeatures
from ..errors import PosprobeError
from .encode import EncodedSet, _Indexed, default_workers, unreadable_list
from .parts import FeatureBatch, Part, Shape, concat_parts, split_levels


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
    """Batches of an ``EncodedSet``'s parts, in memory or memory-mapped (float16 or float32).

    When the float32 working copy fits ``budget_bytes`` it is made once; otherwise every batch is
    converted as it is read, so a memory-mapped cache entry larger than RAM is never loaded whole.
    """

    def __init__(self, encoded: EncodedSet, budget_bytes: int | None = None):
        self.parts, self.feat_size = encoded.parts, encoded.feat_size
        self.channels = encoded.channels
        self.budget_bytes = memory_budget_bytes() if budget_bytes is None else budget_bytes
        self._whole: list[Part] | None = None

    def __len__(self) -> int:
        return self.parts[0].data.shape[0]

    def working_bytes(self) -> int:
        """Bytes of the float32 working copy."""
        return 4 * sum(math.prod(p.data.shape) for p in self.parts)

    def _whole_parts(self, device: torch.device) -> list[Part] | None:
        budget = self.budget_bytes
        if device.type == "cuda":  # the working copy lives on the GPU: it must fit there too
            free, _ = torch.cuda.mem_get_info(device)
            budget = min(budget, int(0.5 * free))
        if self._whole is None and self.working_bytes() <= budget:
            whole = []
            for p in self.parts:
                x = p.data
                if not (
                    x.dtype == torch.float32
                    and p.scale == 1.0
                    and x.device == device
                    and x.is_contiguous(memory_format=torch.channels_last)
                ):
                    x = torch.empty(x.shape, device=device, memory_format=torch.channels_last)
                    for i in range(0, len(self), 64):  # a memory-mapped part is read 64 images at a time
                        x[i : i + 64] = p.values(slice(i, i + 64), device)
                whole.append(Part(p.lo, p.hi, x, p.native))
            self._whole = whole
        return self._whole

    def batches(
        self, order: torch.Tensor, batch_size: int, device: str | torch.device = "cpu"
    ) -> Iterator[tuple[torch.Tensor, FeatureBatch]]:
        """(indices, batch) for consecutive slices of ``order``.

        A batch is gathered into buffers reused from batch to batch (a fresh allocation of this size costs more in
        page faults than the copy): use a batch before taking the next. From the working copy that is one gather;
        from the entry itself (a cache file larger than the budget) a gather of its float16 rows, then one widening
        copy to float32 (measured: 61 ms per update of a VGG16 Table 1 column from the working copy, 96 ms from
        the entry through fresh tensors, 62 ms through these buffers).
        """
        device = torch.device(device)
        whole = self._whole_parts(device)
        parts = whole if whole is not None else self.parts
        rows = [_nhwc_rows(p.data) for p in parts]  # (n, h * w * c) views; None: not stored channels_last
        size = min(batch_size, len(order))
        gathered = [None if r is None else r.new_empty(size, r.shape[1]) for r in rows]
        widened = [
            None if whole is not None or r is None else torch.empty(size, r.shape[1], device=device) for r in rows
        ]  # float32, on the device
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            n = len(idx)
            batch = []
            for p, r, g, w in zip(parts, rows, gathered, widened):
                if r is None:
                    batch.append(Part(p.lo, p.hi, p.values(idx, device), p.native))
                    continue
                out = g[:n]
                torch.index_select(r, 0, idx.to(r.device), out=out)
                if w is not None:
                    out = w[:n].copy_(out)
                    if p.scale != 1.0:
                        out.mul_(p.scale)  # a power of two: exact
                _, c, h, wd = p.data.shape
                batch.append(Part(p.lo, p.hi, out.view(n, h, wd, c).permute(0, 3, 1, 2), p.native))  # channels_last
            yield idx, FeatureBatch(batch, self.feat_size)


def _nhwc_rows(x: torch.Tensor) -> torch.Tensor | None:
    """(n, h * w * c): a channels_last (n, c, h, w) tensor's images as NHWC rows, a view; None for another layout
    (its rows would be a copy of the whole tensor)."""
    nhwc = x.permute(0, 2, 3, 1)
    _, h, w, c = nhwc.shape
    if nhwc.stride()[1:] != (w * c, c, 1):
        return None
    return nhwc.reshape(nhwc.shape[0], -1)


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
    """An image set whose features (as parts) are recomputed by the frozen encoder on every pass.

    Memory does not grow with the number of images: only one batch of images and features is alive at a
    time. The images that cannot be decoded are found once, up front, so every epoch sees the same set
    and the batch order is the one an in-memory set of the same images would get.
    """

    def __init__(
        self,
        backbone,
        images: Dataset,
        feat_size: int = 28,
        device: str | torch.device = "cpu",
        strict: bool = False,
        num_workers: int | None = None,
        encode_batch_size: int = 16,
    ):
        self.backbone, self.images, self.feat_size = backbone, images, feat_size
        self.device = torch.device(device)
        self.name = getattr(images, "name", "images")
        self.description = getattr(images, "description", "")
        all_ids = list(getattr(images, "ids", [str(i) for i in range(len(images))]))
        self.num_workers = default_workers(images) if num_workers is None else num_workers
        self.encode_batch_size = encode_batch_size
        if hasattr(images, "paths"):  # files may be unreadable: find them once
            loader = DataLoader(_Readable(images), batch_size=64, num_workers=self.num_workers, collate_fn=_as_list)
            flags = [ok for batch in loader for _, ok in batch]
        else:
            flags = [True] * len(images)
        bad = [all_ids[i] for i, ok in enumerate(flags) if not ok]
        if bad and strict:
            raise PosprobeError(f"unreadable image in {self.name}: {bad[0]} (--strict stops at the first)")
        self.kept = [i for i, ok in enumerate(flags) if ok]
        if not self.kept:
            raise PosprobeError(
                f"none of the {len(images)} image(s) in {self.name} could be read: " + unreadable_list(bad, images)
            )
        self.ids, self.skipped = [all_ids[i] for i in self.kept], bad
        first = images[self.kept[0]]
        self.levels: list[Shape] = [tuple(s) for s in backbone.level_shapes(first.shape[-1])]
        self.channels = sum(c for c, _, _ in self.levels)

    def __len__(self) -> int:
        return len(self.kept)

    def batches(
        self, order: torch.Tensor, batch_size: int, device: str | torch.device | None = None
    ) -> Iterator[tuple[torch.Tensor, FeatureBatch]]:
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
            try:
                with torch.no_grad():  # not inference_mode: the readout's autograd saves these tensors
                    levels = list(backbone(x))
            except NonFiniteFeatures as err:
                raise err.named([self.ids[int(i)] for i in idx], self.name) from None
            parts = [Part(p.lo, p.hi, p.data.float(), p.native) for p in split_levels(levels, self.feat_size)]
            yield idx, FeatureBatch(parts, self.feat_size)

    def encoded(self, limit: int | None = None) -> EncodedSet:
        """The first ``limit`` images' features in memory, as an ``EncodedSet`` (for previews)."""
        n = len(self) if limit is None else min(limit, len(self))
        batches = [b.parts for _, b in self.batches(torch.arange(n), self.encode_batch_size)]
        return EncodedSet(
            self.name, concat_parts(batches), self.feat_size, self.ids[:n], self.skipped, self.description
        )


FeatureSource = MemorySource | StreamedSet


def as_source(features, budget_bytes: int | None = None) -> FeatureSource:
    """A tensor, an ``EncodedSet`` or a source -> a source."""
    if isinstance(features, (MemorySource, StreamedSet)):
        return features
    if isinstance(features, torch.Tensor):
        features = EncodedSet.from_aligned("features", features, [str(i) for i in range(len(features))])
    if isinstance(features, EncodedSet):
        return MemorySource(features, budget_bytes)
    raise TypeError(f"not a feature source: {type(features).__name__}")
