"""The position probe in the scikit-learn shape: settings in ``__init__``, ``fit`` returns self, learned
state ends in ``_``, then ``predict`` and ``score``.

A probe encodes each image set once with its frozen backbone and trains one readout per target map from
those features; ``fit`` and ``score`` also accept an ``EncodedSet`` so callers can share an encoding.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from .backbones import Backbone
from .errors import PosprobeError
from .features import EncodedSet
from .intervals import bootstrap
from .joint import predict_source
from .metrics import is_constant, mae, spearman
from .readout import Readout, check_readout_config
from .targets import PATTERNS, probe_targets
from .train import PROFILES, ReadoutJob, TrainConfig, train_readouts


@dataclass
class Scores:
    """Per-image scores of one readout on one test set."""

    ids: list[str]
    spc: torch.Tensor  # (N,)
    mae: torch.Tensor  # (N,)
    constant: torch.Tensor  # (N,) bool: prediction carries no rank information (SPC defined as 0)

    def summary(self) -> dict[str, float | int]:
        """Mean, 95% bootstrap interval over images (NaN for a single image) and population standard
        deviation over images (0 for a single image)."""
        spc, err = self.spc.double(), self.mae.double()
        spc_ci, mae_ci = bootstrap(spc), bootstrap(err)
        return {
            "spc_mean": spc_ci.mean, "spc_lo": spc_ci.lo, "spc_hi": spc_ci.hi, "spc_std": float(spc.std(correction=0)),
            "mae_mean": mae_ci.mean, "mae_lo": mae_ci.lo, "mae_hi": mae_ci.hi, "mae_std": float(err.std(correction=0)),
            "n": len(self.ids), "n_constant": int(self.constant.sum()),
        }  # fmt: skip


class PositionProbe:
    """Reads fixed position maps out of a frozen backbone's features with one PEM readout per map."""

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
        from .cache import encode_images

        return encode_images(self.backbone, images, self.feat_size, self.encode_batch_size, self.device,
                             strict=self.strict, progress=self.progress, cache=self.cache,
                             allow_stream=allow_stream)  # fmt: skip

    def new_readout(self) -> Readout:
        """A freshly initialised readout; every target's readout starts from the same seeded weights."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            channels = self.backbone.channels
            return Readout(channels, self.kernel_size, self.depth, self.padding, self.feat_size, self.image_size,
                           self.train_config.readout_width(channels))  # fmt: skip

    def fit(self, images: Dataset | EncodedSet) -> "PositionProbe":
        encoded = self.encode(images)
        channels = encoded.channels
        if channels != self.backbone.channels:
            raise PosprobeError(
                f"features have {channels} channels; {self.backbone.name} declares "
                f"{self.backbone.channels}"
            )
        jobs = [ReadoutJob(name, self.new_readout(), target) for name, target in self.targets.items()]
        train_readouts(encoded, jobs, self.train_config, self.device, self.progress)
        self.readouts_ = {job.key: job.readout.cpu() for job in jobs}
        self.losses_ = {job.key: job.losses for job in jobs}  # every update's training loss
        self.convergence_ = {job.key: job.convergence() for job in jobs}
        self.schedule_ = jobs[0].schedule
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
        encoded = self.encode(images)
        scores = {}
        for name, pred in self.predict(encoded).items():
            target = self.targets[name]
            scores[name] = Scores(encoded.ids, spearman(pred, target), mae(pred, target), is_constant(pred))
        return scores
