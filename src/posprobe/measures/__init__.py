"""Measures of where position sits in a backbone's features, without the paper's trained readout.

Readout-free (nothing is fitted):

- ``position_variance_fraction``: the share of a level's feature variance tied to location, common to all images
  (unbiased U-statistic, with a bootstrap interval over images);
- ``mean_map`` / ``blank_maps``: where the image-independent structure sits, on natural images and on blank ones;
- ``translation_equivariance``: StyleGAN3's EQ-T of the features, over the whole map and away from the borders.

Where position lives (closed-form linear probes at most):

- ``channels``: per-channel position scores from several rankers, and channel ablation;
- ``tokens``: a ViT's patch-token position per block, its position embedding's similarity map, token norms;
- ``canvas``: where content was placed on a constant canvas, from globally pooled features.

Each consumes what the probes consume (an EncodedSet's levels, ``features.levels.level_views``) or runs the
frozen backbone itself.
"""

from .canvas import CanvasImages, GapProbe, Placement, gap_features, photo_contents
from .channels import ChannelRanking, ablate, border_scores, flip_scores, linear_weight_scores
from .equivariance import Equivariance, default_shifts, interior_mask, translation_equivariance
from .feature_maps import BlankMap, blank_maps, mean_map
from .position_variance import PositionVariance, position_variance_fraction
from .tokens import (
    PositionScores,
    TokenLayout,
    TokenNorms,
    TokenPositionProbe,
    TokenSet,
    cosine_similarity_map,
    extract_tokens,
    patch_pos_embed,
    position_chance,
    probe_position,
    split_images,
    token_layout,
    token_norms,
)

__all__ = [
    "BlankMap",
    "CanvasImages",
    "ChannelRanking",
    "Equivariance",
    "GapProbe",
    "Placement",
    "PositionScores",
    "PositionVariance",
    "TokenLayout",
    "TokenNorms",
    "TokenPositionProbe",
    "TokenSet",
    "ablate",
    "blank_maps",
    "border_scores",
    "cosine_similarity_map",
    "default_shifts",
    "extract_tokens",
    "flip_scores",
    "gap_features",
    "interior_mask",
    "linear_weight_scores",
    "mean_map",
    "patch_pos_embed",
    "photo_contents",
    "position_chance",
    "position_variance_fraction",
    "probe_position",
    "split_images",
    "token_layout",
    "token_norms",
    "translation_equivariance",
]
