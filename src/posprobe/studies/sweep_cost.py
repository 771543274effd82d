"""What a sweep will cost before it runs (``posprobe sweep --dry-run``): per group, the images to encode, the
encoder's and the readouts' floating-point operations, the feature cache's size, and a time estimated from this
machine's measured convolution throughput. Estimates, labelled as such: the measured figures are in the README.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ..data import FolderImages, bundled_test_photos, bundled_train_photos
from ..features.parts import plan_parts
from ..output.sweep_html import duration
from ..readouts.pem import Readout, readout_map_size
from .sweep_group import build_backbone
from .sweep_spec import ALL, BUNDLED, NATURAL, ROLLED, Group, SweepSpec, cell_id
from .sweep_store import CellStore


@dataclass
class GroupCost:
    group: Group
    images: int  # to encode: training set and every test set
    encoder_flops: float  # per image
    readout_flops: float  # every readout cell's training, and the linear probes' normal equations
    cache_bytes: int
    updates: int = 0  # SGD updates summed over the group's PEM readouts (each has its own loss and step)
    error: str = ""

    @property
    def flops(self) -> float:
        return self.images * self.encoder_flops + self.readout_flops


def _count(folder: str, bundled: int) -> int:
    return bundled if folder == BUNDLED else len(FolderImages(folder))


def image_counts(spec: SweepSpec, train: str) -> tuple[int, int]:
    """(training images, test images over every test set)."""
    d = spec.data
    natural = _count(d.natural, len(bundled_test_photos()))
    per_set = {NATURAL: natural, ROLLED: natural * d.rolls}
    return _count(train, len(bundled_train_photos()) * d.crops_per_photo), sum(per_set.get(t, 1) for t in d.test)


def flops_per_second(seconds: float = 0.3) -> float:
    """This machine's float32 convolution throughput (a 3x3, 64-channel layer at 56x56), measured now."""
    x, w = torch.randn(8, 64, 56, 56), torch.randn(64, 64, 3, 3)
    F.conv2d(x, w, padding=1)  # warm up
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        F.conv2d(x, w, padding=1)
        runs += 1
    return runs * 2 * 8 * 64 * 64 * 9 * 56 * 56 / (time.perf_counter() - started)


def group_cost(spec: SweepSpec, group: Group) -> GroupCost:
    """A group's images, operations and cache size, from its architecture with random weights and one image."""
    n_train, n_test = image_counts(spec, group.train)
    try:
        backbone = build_backbone(spec, group, "random")  # the architecture is what costs
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            backbone(torch.zeros(1, 3, spec.data.image_size, spec.data.image_size))
        shapes = backbone.level_shapes(spec.data.image_size)
    except Exception as err:  # noqa: BLE001 - the dry run reports it and goes on
        return GroupCost(group, n_train + n_test, math.nan, math.nan, 0, str(err).splitlines()[0])
    fs = spec.data.feat_size
    per_image = sum(math.prod(p.shape(fs)) for p in plan_parts(shapes, fs))
    channels = {lv.name: lv.channels for lv in backbone.levels}
    updates = spec.train.schedule(n_train).updates
    readout = 0.0
    for c in group.cells:
        if c.measure:
            continue
        cin = backbone.channels if c.levels == ALL else sum(channels[n] for n in c.levels.split("+"))
        k, side = c.readout.kernel_size, readout_map_size(fs, c.readout.kernel_size, 1, c.readout.padding)
        if c.kind == "linear":  # the normal equations: n s^2 D^2, D = C k^2 + 1
            readout += n_train * side**2 * (cin * k * k + 1) ** 2 / len(spec.patterns)
        else:  # forward and backward (x3) of the first convolution, which dominates
            readout += 3 * 2 * updates * spec.train.batch_size * cin * k * k * side**2
    readout_updates = updates * sum(c.kind == "pem" for c in group.cells)
    enc = float(counter.get_total_flops())
    return GroupCost(group, n_train + n_test, enc, readout, 2 * per_image * (n_train + n_test), readout_updates)


def seconds_per_update(spec: SweepSpec, channels: int = 64, updates: int = 5) -> float:
    """The cost of one SGD update of one small readout at the spec's sizes (its upsampled map and loss at the
    image's size, optimiser step, Python), measured now: what dominates a sweep of small readouts."""
    fs, size, batch = spec.data.feat_size, spec.data.image_size, spec.train.batch_size
    readout = Readout(channels, 1, 1, 0, fs, size)
    optimiser = torch.optim.SGD(readout.parameters(), lr=0.01)
    x, y = torch.randn(batch, channels, fs, fs), torch.rand(batch, 1, size, size)
    started = time.perf_counter()
    for _ in range(updates):
        optimiser.zero_grad()
        F.mse_loss(readout.forward_aligned(x), y).backward()
        optimiser.step()
    return (time.perf_counter() - started) / updates


def describe_costs(spec: SweepSpec, groups: list[Group], store: CellStore | None = None) -> str:
    """The dry run's table: one line per group and the totals, with the time estimated at this machine's speed;
    ``store``: an earlier run's folder, whose finished cells are not counted."""
    done = store.finished(cell_id(spec, c) for g in groups for c in g.cells) if store is not None else set()
    speed, per_update = flops_per_second(), seconds_per_update(spec)
    width = max([len("group"), *(len(g.label) for g in groups)]) + 2  # whole labels: a checkpoint path ends in its name
    lines = [
        f"{'group':<{width}}{'cells':>6}{'to run':>7}{'images':>8}{'GFLOP/img':>10}{'readout TFLOP':>14}{'cache MB':>9}"
    ]
    flops, seconds, cache, cells, left_total = 0.0, 0.0, 0, 0, 0
    for g in groups:
        todo = tuple(c for c in g.cells if cell_id(spec, c) not in done)
        cost = group_cost(spec, Group(g.setting, g.train, todo or g.cells))  # the readouts still to train
        left = len(todo)
        cells, left_total = cells + len(g.cells), left_total + left
        if cost.error:
            lines.append(f"{g.label:<{width}}{len(g.cells):>6}{left:>7}{cost.images:>8}  cannot build: {cost.error}")
            continue
        if left:
            flops, cache = flops + cost.flops, cache + cost.cache_bytes
            seconds += cost.flops / speed + per_update * cost.updates
        lines.append(
            f"{g.label:<{width}}{len(g.cells):>6}{left:>7}{cost.images:>8}{cost.encoder_flops / 1e9:>10.2f}"
            f"{cost.readout_flops / 1e12:>14.3f}{cost.cache_bytes / 1e6:>9.1f}"
        )
    lines.append(
        f"total: {cells} cells, {left_total} to run; for the groups to run {flops / 1e12:.2f} TFLOP and "
        f"{cache / 1e9:.2f} GB of feature cache; estimated {duration(seconds)} in one process here "
        f"(measured now: {speed / 1e9:.0f} GFLOP/s of convolution, {per_update * 1e3:.0f} ms per readout update)"
    )
    return "\n".join(lines)
