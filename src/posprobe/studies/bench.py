"""``posprobe bench``: what a Table 1 column costs, against the encoder's floor and the authors' protocol.

Four timings in one process, on the same images and the same prepared encoder:

(d) decoding alone: every image read, decoded and resized through the encoder's data loader, no encoder;
(a) the floor: decoding plus one plain forward pass of the frozen encoder over the train and test images (no
    alignment, no readout): what any study on this backbone must pay at least once;
(b) posprobe's Table 1 column: cache extraction (cold), the 5 pattern readouts trained jointly for the
    profile's SGD updates from the cached features, and scoring on every test set (natural + black/white/noise);
(c) the authors' protocol, where the encoder re-runs for every batch of every update of every pattern and
    once per pattern for testing; a few batches are timed and extrapolated to the full count (labelled).

The images are the bundled photos in memory (crops, as the demo trains on), or with ``synthetic_dataset`` JPEG
files at the paper's sizes and count (``bench_dataset``), read from disk as a user's DUT-S folder is. It reports
wall and CPU seconds, images per second, the ratios b/a and c/b, and each phase's peak host (and GPU) memory.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from ..backbones import create_backbone
from ..data import SYNTHETIC, FolderImages, TensorImages, bundled_test_set, bundled_train_set, synthetic_images
from ..errors import PosprobeError
from ..features.cache import FeatureCache
from ..features.encode import _collate, _Indexed, default_workers, prepare_encoder
from ..features.parts import align
from ..readouts.pem import Readout
from ..readouts.probe import PositionProbe
from ..readouts.train import TrainConfig, get_profile
from ..targets import PATTERNS, make_target
from .bench_dataset import split_counts, write_synthetic_dataset


def _rss_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"{field_name}:\s+(\d+)", f.read())
        return int(m.group(1)) if m else None
    except OSError:
        return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux /proc/self/clear_refs); False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory since the last reset (or since start), in MB."""
    kb = _rss_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024


@dataclass
class Phase:
    wall_s: float = 0.0
    cpu_s: float = 0.0
    peak_rss_mb: float = 0.0
    peak_gpu_mb: float = 0.0  # CUDA only
    note: str = ""
    parts: dict[str, float] = field(default_factory=dict)


def _now() -> float:
    """Wall clock after the GPU's queued work has finished (CUDA kernels run asynchronously)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def _cpu_s() -> float:
    """CPU seconds of this process and of its finished children (the data loader's decoding workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@contextlib.contextmanager
def measure(phase: Phase) -> Iterator[Phase]:
    """Time a block (wall, and CPU of the process and its loader workers) and record its peak RSS (of this
    process; and peak GPU memory on CUDA)."""
    reset_peak_rss()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    w, c = _now(), _cpu_s()
    yield phase
    phase.wall_s += _now() - w
    phase.cpu_s += _cpu_s() - c
    phase.peak_rss_mb = max(phase.peak_rss_mb, peak_rss_mb())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        phase.peak_gpu_mb = max(phase.peak_gpu_mb, torch.cuda.max_memory_allocated() / 2**20)


@dataclass
class BenchResult:
    backbone: str
    weights: str
    n_train: int
    n_test: int
    image_size: int
    feat_size: int
    schedule: str  # the Table 1 column's training, in words (updates, passes, distinct images)
    updates: int
    patterns: int
    threads: int
    decode: Phase
    floor: Phase
    posprobe: Phase
    posprobe_warm: Phase
    authors: Phase
    authors_measured: str
    device: str = "cpu"
    dataset: str = ""  # what the images were and where they came from
    run_ratios: list[float] = field(default_factory=list)  # b/a of each interleaved (a, b) run pair

    @property
    def n_images(self) -> int:
        """Every image one pass reads: train, natural test and the synthetic black / white / noise ones."""
        return self.n_train + self.n_test + len(SYNTHETIC)

    def images_per_s(self, phase: Phase) -> float:
        return self.n_images / max(phase.wall_s, 1e-9)

    @property
    def b_over_a(self) -> float:
        return self.posprobe.wall_s / self.floor.wall_s

    @property
    def c_over_b(self) -> float:
        return self.authors.wall_s / self.posprobe.wall_s

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(
            images=self.n_images,
            images_per_s={k: self.images_per_s(getattr(self, k)) for k in ("decode", "floor", "posprobe")},
            b_over_a=self.b_over_a,
            c_over_b=self.c_over_b,
            b_over_a_cpu=self.posprobe.cpu_s / self.floor.cpu_s,
            c_over_b_cpu=self.authors.cpu_s / self.posprobe.cpu_s,
        )
        return out

    def report(self) -> str:
        d, a, b, bw, c = self.decode, self.floor, self.posprobe, self.posprobe_warm, self.authors

        def row(label: str, p: Phase, rate: bool = True) -> str:
            per_s = f"{self.images_per_s(p):>8.1f}" if rate else f"{'':>8}"
            return f"{label:<62}{p.wall_s:>9.1f}{p.cpu_s:>9.1f}{per_s}{p.peak_rss_mb:>13.0f}"

        lines = [
            f"posprobe bench: {self.backbone} ({self.weights}), {self.n_train:,} train + {self.n_test:,} test + "
            f"{len(SYNTHETIC)} synthetic images at {self.image_size} px ({self.dataset}), feat {self.feat_size}, "
            f"{self.patterns} patterns, {self.schedule}, device {self.device}, cpu threads {self.threads}",
            f"{'phase':<62}{'wall s':>9}{'cpu s':>9}{'img/s':>8}{'peak RSS MB':>13}",
            row(f"(d) decode + resize alone, all {self.n_images:,} images", d),
            row(f"(a) floor: decode + one encoder pass over all {self.n_images:,} images", a),
            row("(b) posprobe Table 1 column, cache cold", b),
            "      " + ", ".join(f"{k} {v:.1f} s" for k, v in b.parts.items()),
            row("(b2) the same with the cache warm (a second study)", bw, rate=False),
            row("(c) authors protocol", c, rate=False),
            f"      {self.authors_measured}",
            f"b/a = {self.b_over_a:.2f} (cpu {b.cpu_s / a.cpu_s:.2f})   c/b = {self.c_over_b:.1f} "
            f"(cpu {c.cpu_s / b.cpu_s:.1f})   decode share of the floor: {d.wall_s / a.wall_s:.2f}",
            f"runs: (d) {d.note}; (a) {a.note}; (b) {b.note}; (b2) {bw.note}",
        ]
        if len(self.run_ratios) > 1:  # how much the ratio moves with the machine's noise
            lines.append(
                "b/a of each interleaved run pair: "
                + ", ".join(f"{r:.2f}" for r in self.run_ratios)
                + f" (median {statistics.median(self.run_ratios):.2f})"
            )
        if b.peak_gpu_mb:
            lines.append(
                f"peak GPU memory MB: (d) {d.peak_gpu_mb:.0f}, (a) {a.peak_gpu_mb:.0f}, (b) {b.peak_gpu_mb:.0f}, "
                f"(b2) {bw.peak_gpu_mb:.0f}, (c) {c.peak_gpu_mb:.0f}"
            )
        return "\n".join(lines)


def bench_images(
    n_train: int, n_test: int, image_size: int, seed: int = 0, photos: bool = True
) -> tuple[Dataset, Dataset]:
    """The bundled photos (train crops, test photos) when installed and wanted, else seeded noise images."""
    try:
        if not photos:
            raise PosprobeError("noise images requested")
        train = bundled_train_set(image_size, crops_per_photo=max(1, -(-n_train // 39)), seed=seed)
        test = bundled_test_set(image_size)
        if len(train) >= n_train and len(test) >= n_test:
            return (
                TensorImages(train.images[:n_train], train.ids[:n_train], "bundled-train"),
                TensorImages(test.images[:n_test], test.ids[:n_test], "photos"),
            )
    except PosprobeError:
        pass
    g = torch.Generator().manual_seed(seed)
    make = lambda n, name: TensorImages(
        torch.rand(n, 3, image_size, image_size, generator=g),  # noqa: E731
        [f"{name}{i}" for i in range(n)],
        name,
    )
    return make(n_train, "noise-train"), make(n_test, "noise-test")


def _loader(images: Dataset, batch_size: int, device: str, indices=None) -> DataLoader:
    """The encoder's own data pipeline: decoding in worker processes (one per spare core), pinned for a GPU."""
    data = _Indexed(images) if indices is None else Subset(_Indexed(images), [int(i) for i in indices])
    return DataLoader(
        data,
        batch_size=batch_size,
        collate_fn=_collate,
        num_workers=default_workers(images) if len(data) > batch_size else 0,
        pin_memory=torch.device(device).type == "cuda",
    )


def _decode_only(images: Dataset, batch_size: int, device: str) -> None:
    """(d): every image read, decoded and resized as the encoder gets it, then dropped."""
    for _, x, _ in _loader(images, batch_size, device):
        if x is not None and torch.device(device).type != "cpu":
            x.to(device, non_blocking=True)


@torch.inference_mode()
def _forward_only(backbone, images: Dataset, batch_size: int, device: str) -> None:
    backbone, channels_last = prepare_encoder(backbone, device)
    for _, x, _ in _loader(images, batch_size, device):
        if x is None:
            continue
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        backbone(x)


def _authors_steps(
    backbone,
    images: Dataset,
    readout: Readout,
    opt,
    target: torch.Tensor,
    config: TrainConfig,
    steps: int,
    feat_size: int,
    device: str,
    gen: torch.Generator,
) -> None:
    """``steps`` SGD updates as the authors' code runs them: decode, encoder, alignment and readout step for every
    batch, a fresh shuffle every pass (decoding through the same loader as posprobe's, so the comparison is of the
    protocols alone)."""
    backbone, channels_last = prepare_encoder(backbone, device)
    readout.train()
    done = 0
    while done < steps:
        order = torch.randperm(len(images), generator=gen)[: (steps - done) * config.batch_size]
        for _, x, _ in _loader(images, config.batch_size, device, order):
            x = x.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                feats = align(backbone(x), feat_size)
            pred = readout.forward_aligned(feats)[:, 0]
            loss = F.mse_loss(pred, target.expand_as(pred))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1


@torch.no_grad()
def _authors_test(
    backbone, images: Dataset, readout: Readout, batch_size: int, feat_size: int, device: str, limit: int
) -> int:
    """The authors' test pass over the first ``limit`` images: decode, encoder, readout; returns images read."""
    backbone, channels_last = prepare_encoder(backbone, device)
    readout.eval()
    seen = 0
    for _, x, _ in _loader(images, batch_size, device, range(min(limit, len(images)))):
        x = x.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        readout.forward_aligned(align(backbone(x), feat_size))
        seen += len(x)
    return seen


def bench_dataset(
    synthetic_dataset: int | None,
    dataset_dir: Path | None,
    n_train: int,
    n_test: int,
    image_size: int,
    seed: int,
    photos: bool,
    log,
) -> tuple[Dataset, Dataset, str, tempfile.TemporaryDirectory | None]:
    """(train, natural test, what they are, a temporary folder to clean up): the bundled images in memory, or
    ``synthetic_dataset`` JPEGs written at the paper's sizes to ``dataset_dir`` (reused when already there) or to
    a temporary folder."""
    if synthetic_dataset is None:
        train, test = bench_images(n_train, n_test, image_size, seed, photos)
        return train, test, "in memory, no decoding", None
    n_train, n_test = split_counts(synthetic_dataset)
    tmp = None
    if dataset_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="posprobe-bench-data-")
        root = Path(tmp.name)
    else:
        root = Path(dataset_dir).expanduser()
    train_dir, test_dir = root / "train", root / "test"
    have = [len(list(d.glob("*.jpg"))) if d.is_dir() else 0 for d in (train_dir, test_dir)]
    if have != [n_train, n_test]:
        if any(have):
            raise PosprobeError(
                f"{root} holds {have[0]} train and {have[1]} test JPEGs, not the {n_train} and {n_test} of "
                f"--synthetic-dataset {synthetic_dataset}; give an empty or new --dataset-dir"
            )
        log(f"writing {n_train:,} + {n_test:,} JPEGs at DUT-S sizes to {root}")
        write_synthetic_dataset(root, n_train, n_test, seed, progress=False)
    label = f"JPEG files at DUT-S sizes under {root if tmp is None else 'a temporary folder'}, decoded every pass"
    return FolderImages(train_dir, image_size), FolderImages(test_dir, image_size), label, tmp


def run_bench(
    backbone_name: str = "vgg16",
    weights: str | None = "random",
    n_train: int = 64,
    n_test: int = 12,
    image_size: int = 224,
    feat_size: int = 28,
    profile: str = "official",
    steps: int | None = None,
    epochs: int | None = None,
    authors_batches: int = 20,
    authors_patterns: int = 1,
    encode_batch_size: int = 16,
    device: str = "cpu",
    seed: int = 0,
    repeats: int = 2,
    photos: bool = True,
    synthetic_dataset: int | None = None,
    dataset_dir: Path | None = None,
    progress: bool = False,
    log=print,
) -> BenchResult:
    """Run (d), (a), (b), (b2) and (c) and return the measurements (see the module docstring).

    (d), (a), (b) and (b2) run ``repeats`` times, interleaved, and each keeps its fastest run: on a shared
    machine the minimum is the least disturbed measurement of the same work.
    """
    counts = {"n_train": n_train, "n_test": n_test, "authors_batches": authors_batches, "repeats": repeats}
    bad = [f"{k}={v}" for k, v in counts.items() if v < 1]
    if bad or not 1 <= authors_patterns <= len(PATTERNS):
        raise PosprobeError(
            "bench needs n_train, n_test, authors_batches, repeats >= 1 and 1..5 authors_patterns; given "
            + ", ".join(bad or [f"authors_patterns={authors_patterns}"])
        )
    config = get_profile(profile, steps=steps, epochs=epochs, seed=seed)
    backbone = create_backbone(backbone_name, weights, seed)
    train, test, dataset, tmp = bench_dataset(
        synthetic_dataset, dataset_dir, n_train, n_test, image_size, seed, photos, log
    )
    try:
        tests = {"natural": test, **{k: synthetic_images(k, image_size, seed) for k in SYNTHETIC}}
        schedule = config.schedule(len(train))
        log(f"bench {backbone_name} ({backbone.weights_label}): {len(train)} train, {len(test)} test images")
        _forward_only(backbone, Subset(train, [0, min(1, len(train) - 1)]), 2, device)  # warm-up

        settings = {
            "feat_size": feat_size,
            "image_size": image_size,
            "seed": seed,
            "device": device,
            "encode_batch_size": encode_batch_size,
            "progress": progress,
        }
        runs = _interleaved(backbone, train, tests, config, settings, repeats, log)
        best = {k: _fastest(v) for k, v in runs.items()}
        authors, label = _authors_phase(backbone, train, tests, config, authors_batches, authors_patterns, settings)
        log(f"(c) authors {authors.wall_s:.1f} s ({label})")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return BenchResult(
        backbone_name,
        backbone.weights_label,
        len(train),
        len(test),
        image_size,
        feat_size,
        schedule.describe(),
        schedule.updates,
        len(PATTERNS),
        torch.get_num_threads(),
        best["d"],
        best["a"],
        best["b"],
        best["b2"],
        authors,
        label,
        _device_name(device),
        dataset,
        [b.wall_s / a.wall_s for a, b in zip(runs["a"], runs["b"])],
    )


def _interleaved(backbone, train, tests: dict, config, settings: dict, repeats: int, log) -> dict[str, list[Phase]]:
    """(d), (a), (b) and (b2) ``repeats`` times, interleaved, so a disturbance of the machine falls on all of them."""
    runs: dict[str, list[Phase]] = {"d": [], "a": [], "b": [], "b2": []}
    batch_size, device = settings["encode_batch_size"], settings["device"]
    for _ in range(repeats):
        runs["d"].append(Phase())
        with measure(runs["d"][-1]):
            for images in (train, *tests.values()):
                _decode_only(images, batch_size, device)
        log(f"(d) decode {runs['d'][-1].wall_s:.1f} s")
        runs["a"].append(Phase())
        _floor_pass(backbone, train, tests, batch_size, device, runs["a"][-1])
        log(f"(a) floor {runs['a'][-1].wall_s:.1f} s")
        with tempfile.TemporaryDirectory(prefix="posprobe-bench-") as tmp:
            cache = FeatureCache(tmp, max_gb=1e9, log=lambda m: None)
            for key, label in (("b", "posprobe"), ("b2", "posprobe, cache warm")):
                runs[key].append(Phase())
                _table1_column(backbone, train, tests, config, cache, settings, runs[key][-1])
                log(f"({key}) {label} {runs[key][-1].wall_s:.1f} s")
    return runs


def _fastest(phases: list[Phase]) -> Phase:
    """The least disturbed of repeated measurements of the same work (its peak memory: the largest seen)."""
    best = min(phases, key=lambda p: p.wall_s)
    best.peak_rss_mb = max(p.peak_rss_mb for p in phases)
    best.note = f"fastest of {len(phases)}: " + ", ".join(f"{p.wall_s:.1f}" for p in phases) + " s"
    return best


def _floor_pass(backbone, train, tests: dict, batch_size: int, device: str, phase: Phase) -> None:
    """(a): every image decoded and through the encoder once, the least any protocol must spend."""
    with measure(phase):
        _forward_only(backbone, train, batch_size, device)
        for images in tests.values():
            _forward_only(backbone, images, batch_size, device)


def _table1_column(backbone, train, tests: dict, config, cache: FeatureCache, settings: dict, phase: Phase) -> None:
    """(b) and (b2): posprobe's Table 1 column (encode once through the cache, train 5 readouts, score every test
    set), timed by part."""
    with measure(phase):
        t0 = _now()
        probe = PositionProbe(backbone, PATTERNS, train_config=config, cache=cache, **settings)
        encoded = probe.encode(train)
        t1 = _now()
        probe.fit(encoded)
        t2 = _now()
        for images in tests.values():
            probe.score(images)
        t3 = _now()
    phase.parts = {"encode+cache": t1 - t0, "train 5 readouts": t2 - t1, "encode+score tests": t3 - t2}


def _authors_phase(
    backbone, train, tests: dict, config: TrainConfig, batches: int, patterns: int, settings: dict
) -> tuple[Phase, str]:
    """(c): the authors' loop (decode and encoder in every step, one readout per pattern), run for ``batches``
    updates of ``patterns`` patterns and a test pass over at most ``batches`` batches of each test set, then
    extrapolated to the schedule's updates x 5 patterns and every test image; the phase and how it was obtained."""
    feat_size, image_size, device, seed = (settings[k] for k in ("feat_size", "image_size", "device", "seed"))
    test_batch = settings["encode_batch_size"]
    updates = config.schedule(len(train)).updates
    steps = min(batches, updates)
    test_images = sum(len(t) for t in tests.values())
    authors = Phase()
    with measure(authors):
        gen = torch.Generator().manual_seed(seed)
        train_s, test_s, tested = 0.0, 0.0, 0
        for pattern in PATTERNS[:patterns]:
            torch.manual_seed(seed)
            readout = Readout(backbone.channels, 3, 1, 0, feat_size, image_size).to(device)
            opt = torch.optim.SGD(
                readout.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
            )
            target = make_target(pattern, image_size, image_size).to(device)
            t0 = _now()
            _authors_steps(backbone, train, readout, opt, target, config, steps, feat_size, device, gen)
            t1 = _now()
            for images in tests.values():
                tested += _authors_test(backbone, images, readout, test_batch, feat_size, device, batches * test_batch)
            train_s, test_s = train_s + t1 - t0, test_s + _now() - t1
    measured_wall, measured_cpu = authors.wall_s, authors.cpu_s
    per_update = train_s / (steps * patterns)
    per_test_image = test_s / max(tested, 1)
    total = len(PATTERNS) * (per_update * updates + per_test_image * test_images)
    authors.parts = {"measured": measured_wall, "per update": per_update, "per test image": per_test_image}
    authors.cpu_s = measured_cpu * total / max(measured_wall, 1e-9)
    authors.wall_s = total
    complete = steps == updates and patterns == len(PATTERNS) and tested == test_images * patterns
    label = (
        "measured in full"
        if complete
        else f"extrapolated from {steps} update(s) x {patterns} pattern(s) to {updates:,} x {len(PATTERNS)}"
    )
    return authors, label


def _device_name(device: str) -> str:
    """'cpu', or 'cuda (NVIDIA H100 80GB HBM3)': what the timings were measured on."""
    dev = torch.device(device)
    return f"{dev} ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else str(dev)
