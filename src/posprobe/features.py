"""Encode an image set once: the frozen backbone's levels, aligned to feat_size and concatenated.

The aligned tensor is exactly what every readout consumes, and it depends on neither the pattern, the
epoch nor the readout, so a study computes it once per (backbone, image set) and trains from it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .backbones import Backbone
from .errors import PosprobeError
from .readout import align


@dataclass
class EncodedSet:
    """Aligned features of one image set: (N, C, fs, fs), with the ids of the images that decoded."""

    name: str
    features: torch.Tensor
    ids: list[str]
    skipped: list[str]
    description: str = ""

    def __len__(self) -> int:
        return self.features.shape[0]


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


def default_workers() -> int:
    """Decode images in the background while the encoder computes (one worker per spare core)."""
    return max(0, min(4, (torch.get_num_threads() or 1) - 1))


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
    """Run the frozen backbone over ``images`` once and return the aligned features.

    Images that cannot be decoded are skipped with one warning naming them, or raise under ``strict``.
    """
    name = getattr(images, "name", "images")
    ids = getattr(images, "ids", [str(i) for i in range(len(images))])
    backbone = backbone.to(device).eval()
    channels_last = torch.device(device).type == "cpu"  # measured faster for CPU convolutions
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    workers = default_workers() if num_workers is None else num_workers
    loader = DataLoader(_Indexed(images), batch_size=batch_size, shuffle=False, collate_fn=_collate,
                        num_workers=workers if len(images) > batch_size else 0)  # fmt: skip
    chunks: list[torch.Tensor] = []
    kept: list[int] = []
    bad: list[int] = []
    bar = tqdm(total=len(images), desc=f"encode {name} with {backbone.name}", unit="img", disable=None if progress else True,
               leave=False)  # fmt: skip
    for idx, batch, failed in loader:
        bad += failed
        if strict and failed:
            raise PosprobeError(f"unreadable image in {name}: {ids[failed[0]]} (--strict stops at the first)")
        if batch is not None:
            x = batch.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            aligned = align(backbone(x), feat_size)  # (B, C, fs, fs)
            chunks.append(aligned.to(dtype).contiguous().cpu())
            kept += idx
        bar.update(len(idx) + len(failed))
    bar.close()
    skipped = [ids[i] for i in bad]
    if skipped:
        shown = ", ".join(skipped[:10]) + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else "")
        warnings.warn(f"skipped {len(skipped)} unreadable image(s) in {name}: {shown}", stacklevel=2)
    if not kept:
        raise PosprobeError(f"none of the {len(images)} image(s) in {name} could be read")
    features = torch.cat(chunks).contiguous(memory_format=torch.channels_last)  # fast batch gathers in training
    return EncodedSet(name, features, [ids[i] for i in kept], skipped,
                      getattr(images, "description", ""))  # fmt: skip
