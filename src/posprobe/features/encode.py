"""Encode an image set once: the frozen backbone's levels, aligned to feat_size, as channel parts.

The aligned features are exactly what every readout consumes, and they depend on neither the pattern,
the epoch nor the readout, so a study computes them once per (backbone, image set) and trains from them.
They are kept as parts (parts.py): levels that alignment upsamples stay at their native size.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ..backbones import Backbone
from ..backbones.registry import NonFiniteFeatures
from ..data import display_name
from ..errors import PosprobeError
from .parts import FeatureBatch, Part, concat_parts, split_levels


@dataclass
class EncodedSet:
    """Features of one image set as channel parts (parts.py), with the ids of the images that decoded.

    ``parts`` are the aligned features (N, C, fs, fs) without alignment's upsampled copies: levels that
    alignment upsamples are kept at their native size. ``features`` materialises the aligned tensor.
    """

    name: str
    parts: list[Part]
    feat_size: int
    ids: list[str]
    skipped: list[str]
    description: str = ""

    @classmethod
    def from_aligned(
        cls, name: str, features: torch.Tensor, ids: list[str], skipped: list[str] | None = None, description: str = ""
    ) -> EncodedSet:
        """Already aligned features (N, C, fs, fs) as one part."""
        if features.dim() != 4:
            raise PosprobeError(f"features must be (N, C, fs, fs); got shape {tuple(features.shape)}")
        part = Part(0, features.shape[1], features.contiguous(memory_format=torch.channels_last), False)
        return cls(name, [part], features.shape[-1], ids, list(skipped or []), description)

    @classmethod
    def from_levels(
        cls,
        name: str,
        levels: list[torch.Tensor],
        feat_size: int,
        ids: list[str],
        skipped: list[str] | None = None,
        description: str = "",
    ) -> EncodedSet:
        """Encoder levels (N, c_i, h_i, w_i) of every image, split into parts as ``encode`` does."""
        return cls(name, split_levels(levels, feat_size), feat_size, ids, list(skipped or []), description)

    def __len__(self) -> int:
        return self.parts[0].data.shape[0]

    @property
    def channels(self) -> int:
        return self.parts[-1].hi

    @property
    def features(self) -> torch.Tensor:
        """The aligned features (N, C, fs, fs), float32, channels_last: made on each call, N*C*fs*fs*4 bytes."""
        return FeatureBatch(self.parts, self.feat_size).aligned()

    def head(self, n: int) -> EncodedSet:
        """The first ``n`` images (views, no copy)."""
        parts = [Part(p.lo, p.hi, p.data[:n], p.native, p.scale) for p in self.parts]
        return EncodedSet(self.name, parts, self.feat_size, self.ids[:n], self.skipped, self.description)


def _collate(batch: list[tuple[int, torch.Tensor | None]]) -> tuple[list[int], torch.Tensor | None, list[int]]:
    good = [(i, x) for i, x in batch if x is not None]
    bad = [i for i, x in batch if x is None]
    images = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], images, bad


class _Indexed(Dataset):
    def __init__(self, images: Dataset):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None]:
        return i, self.images[i]


def default_workers(images: Dataset | None = None) -> int:
    """Decode images in the background while the encoder computes (one worker per spare core).

    Images already in memory (a tensor) need no decoding: there a worker only adds the cost of passing
    tensors between processes (measured 4% slower for VGG16 on 2 cores; benchmarks/RESULTS.md).
    """
    if images is not None and isinstance(getattr(images, "images", None), torch.Tensor):
        return 0
    return max(0, min(4, (torch.get_num_threads() or 1) - 1))


def prepare_encoder(backbone: Backbone, device: str | torch.device) -> tuple[Backbone, bool]:
    """The backbone on ``device`` in eval mode, channels_last on CPU (measured fastest there)."""
    backbone = backbone.to(device).eval()
    channels_last = torch.device(device).type == "cpu"
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    return backbone, channels_last


def unreadable_list(ids: list[str], images: Dataset | None = None, shown: int = 10) -> str:
    """'x.jpg (400 megapixels, over ...), y.png and 3 more (under /data/set)': unreadable images named, with the
    reason where the image set can tell it, for a warning or an error; names that are not UTF-8 escaped."""
    why = getattr(images, "unreadable_reason", None)
    named = [display_name(i) + (f" ({r})" if why and (r := why(i)) else "") for i in ids[:shown]]
    text = ", ".join(named) + (f" and {len(ids) - shown} more" if len(ids) > shown else "")
    root = getattr(images, "root", None)
    return text + (f" (under {display_name(root)})" if root is not None else "")


@torch.inference_mode()
def encode_batches(
    backbone: Backbone,
    images: Dataset,
    feat_size: int = 28,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    num_workers: int | None = None,
    start: int = 0,
) -> Iterator[tuple[list[int], list[Part] | None, list[int]]]:
    """Encode images[start:] in order, batch by batch: (indices kept, their parts, indices unreadable).
    Decoding runs in worker processes (one per spare core), overlapped with the encoder; for a GPU the batches
    are pinned and copied without blocking the host.

    A NaN or an infinity in any level stops here, before alignment and before any caller (memory, cache)
    keeps the batch, with one line naming the level and the images (``Backbone.forward`` finds it).
    """
    backbone, channels_last = prepare_encoder(backbone, device)
    workers = default_workers(images) if num_workers is None else num_workers
    subset = _Indexed(images) if start == 0 else Subset(_Indexed(images), range(start, len(images)))
    loader = DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=_collate,
        num_workers=workers if len(subset) > batch_size else 0,
        pin_memory=torch.device(device).type == "cuda",  # page-locked batches copy to the GPU without a staging copy
    )
    for idx, batch, failed in loader:
        if batch is None:
            yield idx, None, failed
            continue
        x = batch.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            levels = backbone(x)
        except NonFiniteFeatures as err:
            ids = getattr(images, "ids", None) or [str(i) for i in range(len(images))]
            raise err.named([ids[idx[r]] for r in range(len(idx))], getattr(images, "name", "")) from None
        yield idx, split_levels(levels, feat_size), failed


@torch.inference_mode()
def encode(
    backbone: Backbone,
    images: Dataset,
    feat_size: int = 28,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    strict: bool = False,
    num_workers: int | None = None,
    progress: bool = True,
) -> EncodedSet:
    """Run the frozen backbone over ``images`` once and return their features (as parts).

    Images that cannot be decoded are skipped with one warning naming them, or raise under ``strict``.
    """
    name = getattr(images, "name", "images")
    ids = getattr(images, "ids", [str(i) for i in range(len(images))])
    batches: list[list[Part]] = []
    kept: list[int] = []
    bad: list[int] = []
    bar = tqdm(
        total=len(images),
        desc=f"encode {name} with {backbone.name}",
        unit="img",
        disable=None if progress else True,
        leave=False,
    )
    for idx, parts, failed in encode_batches(backbone, images, feat_size, batch_size, device, num_workers):
        bad += failed
        if strict and failed:
            raise PosprobeError(
                f"unreadable image in {name}: {unreadable_list([ids[failed[0]]], images)} (--strict stops at the first)"
            )
        if parts is not None:
            # in host memory as it goes, channels_last as the encoder made it (fast gathers and convolutions)
            batches.append([Part(p.lo, p.hi, p.data.to(dtype).cpu(), p.native) for p in parts])
            kept += idx
        bar.update(len(idx) + len(failed))
    bar.close()
    skipped = [ids[i] for i in bad]
    if skipped:
        # stacklevel 1: inference_mode's wrapper would attribute it to torch, whose warnings the CLI silences
        warnings.warn(
            f"skipped {len(skipped)} unreadable image(s) in {name}: {unreadable_list(skipped, images)}", stacklevel=1
        )
    if not kept:
        raise PosprobeError(
            f"none of the {len(images)} image(s) in {name} could be read: " + unreadable_list(skipped, images)
        )
    return EncodedSet(
        name, concat_parts(batches), feat_size, [ids[i] for i in kept], skipped, getattr(images, "description", "")
    )
