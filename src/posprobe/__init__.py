"""posprobe: how much absolute position information does a vision network encode, and where?

Implements the protocol of Islam, Jia & Bruce, "How Much Position Information Do Convolutional Neural
Networks Encode?" (ICLR 2020): a frozen backbone's multi-scale features feed a tiny trainable readout that
must draw a fixed position map; how well it can is the measure.
"""

__version__ = "0.1.0"

import os as _os

# OpenMP threads that sleep when idle instead of spinning: on a CPU shared with other work, spinning
# threads steal the time the working thread needs (measured: readout training 2.5x faster, the encoder no
# slower; see benchmarks/RESULTS.md). Takes effect only if torch is not imported yet; set it to override.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .backbones import Backbone, Level, create_backbone, get_backbone_spec, list_backbones, register_backbone
from .data import FolderImages, TensorImages, bundled_test_set, bundled_train_set, synthetic_images
from .errors import PosprobeError
from .features.cache import FeatureCache
from .features.encode import EncodedSet, encode
from .features.levels import LevelView, level_views
from .features.parts import align
from .features.sources import StreamedSet
from .measures import (
    BlankMap,
    Equivariance,
    PositionVariance,
    blank_maps,
    mean_map,
    position_variance_fraction,
    translation_equivariance,
)
from .metrics import is_constant, mae, spearman
from .readouts.engine import Cell, ReadoutSetting, Scores, score_cells, train_cells
from .readouts.joint import train_readouts
from .readouts.linear import LinearProbe, LinearReadout
from .readouts.pem import Readout
from .readouts.probe import PositionProbe
from .readouts.train import PROFILES, TrainConfig, get_profile
from .targets import PATTERNS, load_target_image, make_target

__all__ = [
    "PATTERNS",
    "PROFILES",
    "Backbone",
    "BlankMap",
    "Cell",
    "EncodedSet",
    "Equivariance",
    "FeatureCache",
    "FolderImages",
    "Level",
    "LevelView",
    "LinearProbe",
    "LinearReadout",
    "PositionProbe",
    "PositionVariance",
    "PosprobeError",
    "Readout",
    "ReadoutSetting",
    "Scores",
    "StreamedSet",
    "TensorImages",
    "TrainConfig",
    "__version__",
    "align",
    "blank_maps",
    "bundled_test_set",
    "bundled_train_set",
    "create_backbone",
    "encode",
    "get_backbone_spec",
    "get_profile",
    "is_constant",
    "level_views",
    "list_backbones",
    "load_target_image",
    "mae",
    "make_target",
    "mean_map",
    "position_variance_fraction",
    "register_backbone",
    "score_cells",
    "spearman",
    "synthetic_images",
    "train_cells",
    "train_readouts",
    "translation_equivariance",
]
