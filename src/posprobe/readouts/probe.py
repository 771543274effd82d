"""The position probe in the scikit-learn shape: settings in ``__init__``, ``fit`` returns self, learned
state ends in ``_``, then ``predict`` and ``score``.

A probe encodes each image set once with its frozen backbone and trains one readout per target map from
those features; ``fit`` and ``score`` also accept an ``EncodedSet`` so callers can share an encoding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.utils.data import Dataset

from ..backbones import Backbone
from ..errors import PosprobeError
from ..features.cache import encode_images
from ..features.encode import EncodedSet
from ..targets import PATTERNS, probe_targets
from .engine import Cell, ReadoutSetting, Scores, new_readout, score_cells, train_cells
from .joint import predict_source
from .pem import Readout, check_readout_config
from .train import PROFILES, TrainConfig


class PositionProbe:
    """Reads fixed position maps out of a frozen backbone's features with one PEM readout per map.

    ``seed`` draws the readouts' initial weights and the batch order (``train_config.seed`` is replaced by it)."""

    def __init__(
        self,
        backbone: Backbone,
        patterns: Sequence[str] = PATTERNS,
        kernel_size: int = 3,
        depth: int = 1,
        padding: int = 0,
        feat_size: int = 28,
        image_size: int = 224,
        train_config: TrainConfig = PROFILES["official"],
        seed: int = 0,
        device: str | torch.device = "cpu",
        extra_targets: Mapping[str, torch.Tensor] | None = None,
        encode_batch_size: int = 16,
        strict: bool = False,
        progress: bool = True,
        cache=None,
    ):
        check_readout_config(feat_size, kernel_size, depth, padding)
        self.backbone, self.patterns = backbone, list(patterns)
        self.kernel_size, self.depth, self.padding = kernel_size, depth, padding
        self.feat_size, self.image_size = feat_size, image_size
        self.train_config, self.seed, self.device = train_config, seed, device
        self.encode_batch_size, self.strict, self.progress = encode_batch_size, strict, progress
        self.cache = cache  # a cache.FeatureCache: encode through it (None: in memory, float32)
        self.targets = probe_targets(self.patterns, extra_targets, image_size)

    def encode(self, images: Dataset | EncodedSet, allow_stream: bool = True) -> EncodedSet:
        """Images -> EncodedSet (or a StreamedSet when the cache says the set is too large to keep, unless
        ``allow_stream`` is False: then in memory)."""
        return encode_images(
            self.backbone,
            images,
            self.feat_size,
            self.encode_batch_size,
            self.device,
            strict=self.strict,
            progress=self.progress,
            cache=self.cache,
            allow_stream=allow_stream,
        )

    def new_readout(self) -> Readout:
        """A freshly initialised readout; every target's readout starts from the same seeded weights."""
        channels = self.backbone.channels
        return new_readout(
            ReadoutSetting(self.kernel_size, self.depth, self.padding),
            self.seed,
            channels,
            self.feat_size,
            self.image_size,
            self.train_config.readout_width(channels),
        )

    def cells(self) -> dict[str, Cell]:
        """Target name -> the engine's cell for it: this probe's readout setting and seed."""
        setting = ReadoutSetting(self.kernel_size, self.depth, self.padding)
        return {name: Cell(setting, name, self.seed) for name in self.targets}

    def fit(self, images: Dataset | EncodedSet) -> PositionProbe:
        encoded = self.encode(images)
        channels = encoded.channels
        if channels != self.backbone.channels:
            raise PosprobeError(
                f"features have {channels} channels; {self.backbone.name} declares {self.backbone.channels}"
            )
        trained = train_cells(
            encoded,
            list(self.cells().values()),
            self.targets,
            self.backbone,
            self.train_config,
            self.feat_size,
            self.image_size,
            self.device,
            self.progress,
        )
        self.trained_ = {name: trained[cell] for name, cell in self.cells().items()}
        self.readouts_ = {name: t.readout.cpu() for name, t in self.trained_.items()}
        self.losses_ = {name: t.losses for name, t in self.trained_.items()}  # every update's training loss
        self.convergence_ = {name: t.convergence for name, t in self.trained_.items()}
        self.schedule_ = next(iter(self.trained_.values())).schedule
        self.train_ids_, self.train_skipped_ = encoded.ids, encoded.skipped
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "readouts_"):
            raise PosprobeError("this probe is not fitted yet: call fit() first")

    def predict(self, images: Dataset | EncodedSet) -> dict[str, torch.Tensor]:
        """Predicted maps (N, S, S) per target."""
        self._check_fitted()
        return predict_source(self.readouts_, self.encode(images), device=self.device)  # one pass for all readouts

    def score(self, images: Dataset | EncodedSet) -> dict[str, Scores]:
        """Per-image SPC and MAE at full resolution for every target."""
        self._check_fitted()
        cells = self.cells()
        scores = score_cells(
            {cells[name]: t for name, t in self.trained_.items()}, self.encode(images), self.targets, self.device
        )
        return {name: scores[cell] for name, cell in cells.items()}
