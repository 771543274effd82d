"""Training readouts on aligned features, as the authors' code does (MSE, SGD with momentum, step decay).

Several readouts that share one feature tensor train in the same pass over it, each with its own
parameters and optimiser. The batch order comes from ``TrainConfig.seed`` alone, so training readouts
together gives exactly the result of training each alone with the same seeds.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import PosprobeError, unknown_choice
from .readout import Readout


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; the defaults are the authors' (the ``official`` profile)."""

    epochs: int = 15
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 32
    lr_milestones: tuple[int, ...] = (10,)
    lr_gamma: float = 0.1
    shuffle: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise PosprobeError(
                f"training needs epochs >= 1, batch size >= 1 and lr > 0; given epochs={self.epochs}, "
                f"batch_size={self.batch_size}, lr={self.lr}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, TrainConfig] = {
    "official": TrainConfig(),
    # The demo's profile: the same optimiser with fewer epochs, the decay at the same fraction of training.
    "quick": TrainConfig(epochs=8, lr_milestones=(6,)),
}


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
        return x if self.channels is None else x[:, self.channels]


def train_readouts(
    features: torch.Tensor,
    jobs: list[ReadoutJob],
    config: TrainConfig,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> list[ReadoutJob]:
    """Train every job's readout on ``features`` (N, C, fs, fs); fills each job's per-epoch mean loss."""
    n = features.shape[0]
    if n == 0:
        raise PosprobeError("no training images to train the readout on")
    opts, scheds = [], []
    for job in jobs:
        job.readout.to(device).train()
        job.target = job.target.to(device)
        opt = torch.optim.SGD(job.readout.parameters(), lr=config.lr, momentum=config.momentum,
                              weight_decay=config.weight_decay)  # fmt: skip
        opts.append(opt)
        scheds.append(torch.optim.lr_scheduler.MultiStepLR(opt, list(config.lr_milestones), config.lr_gamma))
    gen = torch.Generator().manual_seed(config.seed)
    bar = tqdm(total=config.epochs, desc=f"train {len(jobs)} readout(s)", unit="epoch", disable=None if progress else True,
               leave=False)  # fmt: skip
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=gen) if config.shuffle else torch.arange(n)
        sums = [0.0] * len(jobs)
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            # (b, C, fs, fs); channels_last makes the readout's convolutions several times faster on CPU
            x = features[idx].to(device=device, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
            for j, (job, opt) in enumerate(zip(jobs, opts)):
                pred = job.readout.forward_aligned(job.inputs(x))[:, 0]  # (b, S, S)
                loss = F.mse_loss(pred, job.target.expand_as(pred))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sums[j] += loss.item() * len(idx)
        for j, (job, sched) in enumerate(zip(jobs, scheds)):
            sched.step()
            job.losses.append(sums[j] / n)
        bar.update(1)
    bar.close()
    for job in jobs:
        job.readout.eval()
    return jobs


@torch.inference_mode()
def predict(readout: Readout, features: torch.Tensor, batch_size: int = 64,
            device: str | torch.device = "cpu", channels: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """(N, S, S) predicted maps of an eval-mode readout for aligned features (N, C, fs, fs).

    ``channels`` selects the input channels the readout was trained on (None: all).
    """
    readout = readout.to(device).eval()
    out = []
    for i in range(0, features.shape[0], batch_size):
        x = features[i : i + batch_size]
        x = x if channels is None else x[:, channels]
        x = x.to(device=device, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
        out.append(readout.forward_aligned(x)[:, 0].cpu())
    return torch.cat(out)
