"""The position probe: the paper's readout (``pem.Readout``) trained per target map through the engine, in the
scikit-learn shape of ``estimator.Estimator``; ``fit`` and ``score`` also accept an ``EncodedSet`` so callers
can share an encoding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.utils.data import Dataset

from ..backbones import Backbone
from ..features.encode import EncodedSet
from ..targets import PATTERNS
from .engine import Cell, ReadoutSetting, Scores, new_readout, score_cells, train_cells
from .estimator import Estimator
from .pem import Readout
from .train import PROFILES, TrainConfig


class PositionProbe(Estimator):
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
        super().__init__(
            backbone,
            patterns,
            kernel_size,
            depth,
            padding,
            feat_size,
            image_size,
            seed,
            device,
            extra_targets,
            encode_batch_size,
            strict,
            progress,
            cache,
        )
        self.train_config = train_config

    def new_readout(self) -> Readout:
        """A freshly initialised readout; every target's readout starts from the same seeded weights."""
        channels = self.backbone.channels
        setting = ReadoutSetting(self.kernel_size, self.depth, self.padding)
        return new_readout(
            setting, self.seed, channels, self.feat_size, self.image_size, self.train_config.readout_width(channels)
        )

    def cells(self) -> dict[str, Cell]:
        """Target name -> the engine's cell for it: this probe's readout setting and seed."""
        setting = ReadoutSetting(self.kernel_size, self.depth, self.padding)
        return {name: Cell(setting, name, self.seed) for name in self.targets}

    def fit(self, images: Dataset | EncodedSet) -> PositionProbe:
        encoded = self.encode(images)
        self._check_channels(encoded.channels)
        cells = self.cells()
        trained = train_cells(
            encoded,
            list(cells.values()),
            self.targets,
            self.backbone,
            self.train_config,
            self.feat_size,
            self.image_size,
            self.device,
            self.progress,
        )
        self.trained_ = {name: trained[cell] for name, cell in cells.items()}
        self.readouts_ = {name: t.readout.cpu() for name, t in self.trained_.items()}
        self.losses_ = {name: t.losses for name, t in self.trained_.items()}  # every update's training loss
        self.convergence_ = {name: t.convergence for name, t in self.trained_.items()}
        self.schedule_ = next(iter(self.trained_.values())).schedule
        self.train_ids_, self.train_skipped_ = encoded.ids, encoded.skipped
        return self

    def score(self, images: Dataset | EncodedSet) -> dict[str, Scores]:
        """Per-image SPC and MAE at full resolution for every target (through the engine, as every study)."""
        self._check_fitted()
        cells = self.cells()
        trained = {cells[name]: t for name, t in self.trained_.items()}
        scores = score_cells(trained, self.encode(images), self.targets, self.device)
        return {name: scores[cell] for name, cell in cells.items()}
