"""Training readouts on aligned features, as the authors' code does (MSE, SGD with momentum, step decay).

Several readouts that share one feature tensor train in the same pass over it, each with its own
parameters and optimiser. The batch order comes from ``TrainConfig.seed`` alone, so training readouts
together gives exactly the result of training each alone with the same seeds.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch

from .errors import PosprobeError, unknown_choice
from .readout import Readout


@dataclass(frozen=True)
class TrainConfig:
    """How much a readout is trained, and how wide a deep one is; the defaults are the authors' (``official``)."""

    epochs: int = 15
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 32
    lr_milestones: tuple[int, ...] = (10,)
    lr_gamma: float = 0.1
    shuffle: bool = True
    seed: int = 0
    # Intermediate channels of depth > 1 readouts are capped here (None: C -> C, the authors'). At VGG16's
    # C = 1472 one C -> C layer costs ~50 GFLOP per image per epoch, hours for Table 2(a) on 2 CPU cores.
    max_readout_width: int | None = None

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise PosprobeError(
                f"training needs epochs >= 1, batch size >= 1 and lr > 0; given epochs={self.epochs}, "
                f"batch_size={self.batch_size}, lr={self.lr}"
            )
        if self.max_readout_width is not None and self.max_readout_width < 1:
            raise PosprobeError(f"--readout-width must be >= 1; given {self.max_readout_width}")

    def readout_width(self, in_channels: int) -> int | None:
        """Intermediate channels for a deep readout on ``in_channels`` inputs (None: C -> C)."""
        if self.max_readout_width is None or self.max_readout_width >= in_channels:
            return None
        return self.max_readout_width

    def describe(self, deep: bool = True) -> str:
        """The schedule in words, for report headers; ``deep``: also the width of depth > 1 readouts."""
        width = "C -> C" if self.max_readout_width is None else f"at most {self.max_readout_width} channels"
        return (f"{self.epochs} epochs, SGD lr {self.lr} (x{self.lr_gamma} at {list(self.lr_milestones)}), "
                f"momentum {self.momentum}, weight decay {self.weight_decay}, batch {self.batch_size}"
                + (f"; intermediate readout layers {width}" if deep else ""))

    def to_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, TrainConfig] = {
    "official": TrainConfig(),
    # The demo's profile: the same optimiser with fewer epochs, the decay at the same fraction of training,
    # and deep readouts 32 channels wide (x, y and their nonlinear mixes need few), so every table runs on the
    # bundled photos on 2 CPU cores (Table 2(a) at VGG16 width 1472 would take hours there).
    "quick": TrainConfig(epochs=8, lr_milestones=(6,), max_readout_width=32),
}


def is_official(config: TrainConfig) -> bool:
    """Whether a schedule is the authors' own (any seed), so reports never claim it when an option changed it."""
    return replace(config, seed=0) == replace(PROFILES["official"], seed=0)


def get_profile(name: str, **overrides) -> TrainConfig:
    """A named profile with any non-None overrides applied (e.g. epochs=3)."""
    if name not in PROFILES:
        raise unknown_choice("training profile", name, PROFILES)
    base = PROFILES[name]
    changes = {k: v for k, v in overrides.items() if v is not None}
    if "epochs" in changes and "lr_milestones" not in changes:  # keep the decay at the same fraction
        frac = [m / base.epochs for m in base.lr_milestones]
        changes["lr_milestones"] = tuple(max(1, round(f * changes["epochs"])) for f in frac)
    return replace(base, **changes)


@dataclass
class ReadoutJob:
    """One readout to train against one fixed target map (H, W)."""

    key: str
    readout: Readout
    target: torch.Tensor
    channels: torch.Tensor | None = None  # input channel indices (a subset of levels); None: all
    losses: list[float] = field(default_factory=list)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels is None:
            return x
        return x[:, self.channels].contiguous(memory_format=torch.channels_last)  # indexing drops the layout


def train_readouts(
    features,
    jobs: list[ReadoutJob],
    config: TrainConfig,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> list[ReadoutJob]:
    """Train every job's readout on ``features``; fills each job's per-epoch mean loss.

    ``features``: aligned features (N, C, fs, fs) as a tensor, an ``EncodedSet`` or a feature source (a
    cache entry, or a ``StreamedSet`` that re-runs the encoder every epoch). All jobs train in one pass
    per epoch (``joint.train_jobs``: fused first convolutions, loss on the small map, both exact).
    """
    from .joint import train_jobs

    return train_jobs(features, jobs, config, device, progress)


def predict(readout: Readout, features, batch_size: int = 64, device: str | torch.device = "cpu",
            channels: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """(N, S, S) predicted maps of an eval-mode readout for aligned features (N, C, fs, fs) or any feature
    source (``joint.predict_source`` predicts several readouts in one pass).

    ``channels`` selects the input channels the readout was trained on (None: all).
    """
    from .joint import predict_source

    return predict_source({"map": readout}, features, batch_size, device, {"map": channels})["map"]
