"""Readout-free measures of position in a backbone's features: no readout is trained, nothing is fitted.

- ``position_variance_fraction``: the share of a level's feature variance tied to location, common to all images
  (unbiased U-statistic, with a bootstrap interval over images);
- ``mean_map`` / ``blank_maps``: where the image-independent structure sits, on natural images and on blank ones;
- ``translation_equivariance``: StyleGAN3's EQ-T of the features, over the whole map and away from the borders.

Each consumes what the probes consume (an EncodedSet's levels, ``features.levels.level_views``) or runs the
frozen backbone itself.
"""

from .equivariance import Equivariance, default_shifts, interior_mask, translation_equivariance
from .feature_maps import BlankMap, blank_maps, mean_map
from .position_variance import PositionVariance, position_variance_fraction

__all__ = [
    "BlankMap",
    "Equivariance",
    "PositionVariance",
    "blank_maps",
    "default_shifts",
    "interior_mask",
    "mean_map",
    "position_variance_fraction",
    "translation_equivariance",
]
