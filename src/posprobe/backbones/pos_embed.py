"""Position-embedding controls for vision transformers: the part "remove padding" plays for CNNs.

A ViT is told where each patch is by a learned absolute position embedding added to the patch tokens;
its attention is otherwise permutation-equivariant and its patch embedding pads nothing. Zeroing that
embedding (``zero``) removes the explicit signal; permuting it over the patch positions with a seeded
permutation (``shuffle``) keeps every vector but breaks its tie to the grid, so a readout of *absolute*
position must then rely on whatever else the network has. Class and register token positions are left
alone: they carry no grid location.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import PosprobeError, unknown_choice

POS_EMBEDS = ("keep", "zero", "shuffle")


def check_pos_embed_mode(mode: str) -> str:
    if mode not in POS_EMBEDS:
        raise unknown_choice("position-embedding control", mode, POS_EMBEDS)
    return mode


def _owner(model: nn.Module) -> nn.Module | None:
    """The module holding a learned absolute ``pos_embed`` parameter (a timm ViT, DeiT, CaiT, PiT...)."""
    for m in model.modules():
        if isinstance(getattr(m, "pos_embed", None), nn.Parameter):
            return m
    return None


def _num_patches(owner: nn.Module, pos_embed: torch.Tensor) -> int:
    patch_embed = getattr(owner, "patch_embed", None)
    n = getattr(patch_embed, "num_patches", None)
    if n is None and getattr(patch_embed, "grid_size", None) is not None:
        n = math.prod(patch_embed.grid_size)
    return int(n) if n is not None else pos_embed.shape[1] - int(getattr(owner, "num_prefix_tokens", 0))


def set_pos_embed(model: nn.Module, mode: str, seed: int = 0, backbone: str = "the backbone") -> str:
    """Zero or permute (seeded) the patch positions of ``model``'s learned absolute position embedding.

    Returns what was done, in words, for the run's config. Refuses models without such an embedding.
    """
    check_pos_embed_mode(mode)
    if mode == "keep":
        return "position embedding kept"
    owner = _owner(model)
    if owner is None:
        names = [n for n, _ in model.named_parameters()]
        how = (
            "it encodes position with a relative position bias inside attention"
            if any("relative_position" in n for n in names)
            else "it is not a vision transformer with a pos_embed parameter"
        )
        if any(isinstance(getattr(m, "pos_embed", None), nn.Module) for m in model.modules()):
            how = "its pos_embed is a module (a conditional, convolutional position encoding), not a parameter"
        raise PosprobeError(
            f"--pos-embed {mode} needs a learned absolute position embedding, and {backbone} has none ({how}); "
            "use --pos-embed keep"
        )
    pe = owner.pos_embed
    with torch.no_grad():
        if pe.dim() == 4:  # (1, D, H, W) grid (PiT): every position is a patch position
            grid = pe.flatten(2)  # (1, D, H*W)
            n, prefix = grid.shape[2], 0
            if mode == "zero":
                pe.zero_()
            else:
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
                pe.copy_(grid[:, :, perm].view_as(pe))
        else:  # (1, prefix + N, D): class / distillation / register positions first, then the N patches
            n = _num_patches(owner, pe)
            prefix = pe.shape[1] - n
            if prefix < 0:
                raise PosprobeError(
                    f"{backbone}'s pos_embed has {pe.shape[1]} positions for {n} patches; cannot {mode} it"
                )
            if mode == "zero":
                pe[:, prefix:].zero_()
            else:
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
                pe[:, prefix:] = pe[:, prefix:][:, perm].clone()
    kept = f", {prefix} prefix-token position(s) kept" if prefix else ""
    verb = "zeroed" if mode == "zero" else f"permuted (seed {seed})"
    rope = any(getattr(m, "rope", None) is not None for m in model.modules())
    untouched = "; its rotary position embedding inside attention is untouched" if rope else ""
    return f"position embedding {verb} at {n} patch positions{kept}{untouched}"
