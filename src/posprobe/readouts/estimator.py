"""What the two probes share, in the scikit-learn shape: settings in ``__init__``, ``fit`` returns self, learned
state ends in ``_`` (``readouts_``: a readout per target), then ``predict`` and ``score``.

``probe.PositionProbe`` trains the paper's readout; ``linear.LinearProbe`` solves the best linear one. Both encode
each image set once with their frozen backbone (through the feature cache when one is given), and both score
with ``engine.score_maps``, so a table can put their numbers side by side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.utils.data import Dataset

from ..errors import PosprobeError
from ..features.cache import encode_images
from ..features.encode import EncodedSet
from ..features.sources import as_source
from ..targets import PATTERNS, probe_targets
from .engine import Scores, score_maps
from .joint import predict_source
from .pem import check_readout_config


class Estimator:
    """Settings both probes take; ``depth`` is the readout's number of layers (1 for the linear probe)."""

    fitted_name = "probe"  # how 'not fitted yet' names it

    def __init__(
        self,
        backbone,
        patterns: Sequence[str] = PATTERNS,
        kernel_size: int = 3,
        depth: int = 1,
        padding: int = 0,
        feat_size: int = 28,
        image_size: int = 224,
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
        self.seed, self.device = seed, device
        self.encode_batch_size, self.strict, self.progress = encode_batch_size, strict, progress
        self.cache = cache  # a features.cache.FeatureCache: encode through it (None: in memory, float32)
        self.targets = probe_targets(self.patterns, extra_targets, image_size)

    def encode(self, images: Dataset | EncodedSet, allow_stream: bool = True):
        """Images -> features (an EncodedSet, or a StreamedSet when the cache says the set is too large to keep,
        unless ``allow_stream`` is False: then in memory); features pass through."""
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

    def _check_channels(self, channels: int) -> None:
        if self.backbone is not None and channels != self.backbone.channels:
            raise PosprobeError(
                f"features have {channels} channels; {self.backbone.name} declares {self.backbone.channels}"
            )

    def _check_fitted(self) -> None:
        if not hasattr(self, "readouts_"):
            raise PosprobeError(f"this {self.fitted_name} is not fitted yet: call fit() first")

    def predict(self, images: Dataset | EncodedSet) -> dict[str, torch.Tensor]:
        """Predicted maps (N, S, S) per target, in one pass over the features for all of them."""
        self._check_fitted()
        return predict_source(self.readouts_, self.encode(images), device=self.device)

    def score(self, images: Dataset | EncodedSet) -> dict[str, Scores]:
        """Per-image SPC and MAE at full resolution for every target."""
        encoded = self.encode(images)
        ids = list(getattr(encoded, "ids", [str(i) for i in range(len(as_source(encoded)))]))
        return {name: score_maps(ids, pred, self.targets[name]) for name, pred in self.predict(encoded).items()}
