"""``posprobe bench``: what a Table 1 column costs, against the encoder's floor and the authors' protocol.

Three timings in one process, on the same images and the same prepared encoder:

(a) the floor: one plain forward pass of the frozen encoder over the train and test images (no alignment,
    no readout): what any study on this backbone must pay at least once;
(b) posprobe's Table 1 column: cache extraction (cold), the 5 pattern readouts trained jointly for all
    epochs from the cached features, and scoring on every test set (natural + black/white/noise);
(c) the authors' protocol, where the encoder re-runs for every batch of every epoch of every pattern and
    once per pattern for testing; a few epochs are timed and extrapolated to the full count (labelled).

It reports wall and CPU seconds, the ratios b/a and c/b, and each phase's peak resident memory.
"""

from __future__ import annotations

import contextlib
import re
import resource
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..backbones import create_backbone
from ..data import SYNTHETIC, TensorImages, bundled_test_set, bundled_train_set, synthetic_images
from ..errors import PosprobeError
from ..features.cache import FeatureCache
from ..features.encode import _collate, _Indexed, default_workers, prepare_encoder
from ..features.parts import align
from ..readouts.pem import Readout
from ..readouts.probe import PositionProbe
from ..readouts.train import get_profile
from ..targets import PATTERNS, make_target


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


@contextlib.contextmanager
def measure(phase: Phase) -> Iterator[Phase]:
    """Time a block (wall and process CPU) and record its peak RSS (and peak GPU memory on CUDA)."""
    reset_peak_rss()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
    w, c = _now(), time.process_time()
    yield phase
    phase.wall_s += _now() - w
    phase.cpu_s += time.process_time() - c
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
    epochs: int
    patterns: int
    threads: int
    floor: Phase
    posprobe: Phase
    posprobe_warm: Phase
    authors: Phase
    authors_measured: str
    device: str = "cpu"
    run_ratios: list[float] = field(default_factory=list)  # b/a of each interleaved (a, b) run pair

    @property
    def b_over_a(self) -> float:
        return self.posprobe.wall_s / self.floor.wall_s

    @property
    def c_over_b(self) -> float:
        return self.authors.wall_s / self.posprobe.wall_s

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(
            b_over_a=self.b_over_a,
            c_over_b=self.c_over_b,
            b_over_a_cpu=self.posprobe.cpu_s / self.floor.cpu_s,
            c_over_b_cpu=self.authors.cpu_s / self.posprobe.cpu_s,
        )
        return out

    def report(self) -> str:
        a, b, bw, c = self.floor, self.posprobe, self.posprobe_warm, self.authors
        n_all = self.n_train + self.n_test + len(SYNTHETIC)
        lines = [
            f"posprobe bench: {self.backbone} ({self.weights}), {self.n_train} train + {self.n_test} test + "
            f"{len(SYNTHETIC)} synthetic images at {self.image_size} px, feat {self.feat_size}, "
            f"{self.patterns} patterns x {self.epochs} epochs, device {self.device}, cpu threads {self.threads}",
            f"{'phase':<62}{'wall s':>9}{'cpu s':>9}{'peak RSS MB':>13}",
            f"{'(a) floor: one encoder forward pass over all ' + str(n_all) + ' images':<62}"
            f"{a.wall_s:>9.1f}{a.cpu_s:>9.1f}{a.peak_rss_mb:>13.0f}",
            f"{'(b) posprobe Table 1 column, cache cold':<62}{b.wall_s:>9.1f}{b.cpu_s:>9.1f}{b.peak_rss_mb:>13.0f}",
            "      " + ", ".join(f"{k} {v:.1f} s" for k, v in b.parts.items()),
            f"{'(b2) the same with the cache warm (a second study)':<62}{bw.wall_s:>9.1f}{bw.cpu_s:>9.1f}"
            f"{bw.peak_rss_mb:>13.0f}",
            f"{'(c) authors protocol, ' + self.authors_measured:<62}{c.wall_s:>9.1f}{c.cpu_s:>9.1f}"
            f"{c.peak_rss_mb:>13.0f}",
            f"b/a = {self.b_over_a:.2f} (cpu {b.cpu_s / a.cpu_s:.2f})   c/b = {self.c_over_b:.1f} "
            f"(cpu {c.cpu_s / b.cpu_s:.1f})",
            f"runs: (a) {a.note}; (b) {b.note}; (b2) {bw.note}",
        ]
        if len(self.run_ratios) > 1:  # how much the ratio moves with the machine's noise
            lines.append(
                "b/a of each interleaved run pair: "
                + ", ".join(f"{r:.2f}" for r in self.run_ratios)
                + f" (median {statistics.median(self.run_ratios):.2f})"
            )
        if b.peak_gpu_mb:
            lines.append(
                f"peak GPU memory MB: (a) {a.peak_gpu_mb:.0f}, (b) {b.peak_gpu_mb:.0f}, "
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


@torch.inference_mode()
def _forward_only(backbone, images: Dataset, batch_size: int, device: str) -> None:
    backbone, channels_last = prepare_encoder(backbone, device)
    loader = DataLoader(
        _Indexed(images),
        batch_size=batch_size,
        collate_fn=_collate,
        num_workers=default_workers(images) if len(images) > batch_size else 0,
    )
    for _, x, _ in loader:
        x = x.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        backbone(x)


def _authors_epoch(
    backbone,
    images: Dataset,
    readout: Readout,
    opt,
    target: torch.Tensor,
    batch_size: int,
    feat_size: int,
    device: str,
    gen: torch.Generator,
) -> None:
    """One epoch as the authors' code runs it: encoder, alignment and readout step for every batch."""
    backbone, channels_last = prepare_encoder(backbone, device)
    order = torch.randperm(len(images), generator=gen)
    readout.train()
    for start in range(0, len(images), batch_size):
        x = torch.stack([images[int(i)] for i in order[start : start + batch_size]]).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            feats = align(backbone(x), feat_size)
        pred = readout.forward_aligned(feats)[:, 0]
        loss = F.mse_loss(pred, target.expand_as(pred))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@torch.no_grad()
def _authors_test(backbone, images: Dataset, readout: Readout, batch_size: int, feat_size: int, device: str) -> None:
    backbone, channels_last = prepare_encoder(backbone, device)
    readout.eval()
    for start in range(0, len(images), batch_size):
        x = torch.stack([images[i] for i in range(start, min(start + batch_size, len(images)))]).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        readout.forward_aligned(align(backbone(x), feat_size))


def run_bench(
    backbone_name: str = "vgg16",
    weights: str | None = "random",
    n_train: int = 64,
    n_test: int = 12,
    image_size: int = 224,
    feat_size: int = 28,
    epochs: int = 15,
    authors_epochs: int = 1,
    authors_patterns: int = 1,
    encode_batch_size: int = 16,
    device: str = "cpu",
    seed: int = 0,
    repeats: int = 2,
    photos: bool = True,
    progress: bool = False,
    log=print,
) -> BenchResult:
    """Run (a), (b), (b2) and (c) and return the measurements (see the module docstring).

    (a), (b) and (b2) run ``repeats`` times, interleaved, and each keeps its fastest run: on a shared
    machine the minimum is the least disturbed measurement of the same work.
    """
    counts = {
        "n_train": n_train,
        "n_test": n_test,
        "epochs": epochs,
        "authors_epochs": authors_epochs,
        "repeats": repeats,
    }
    bad = [f"{k}={v}" for k, v in counts.items() if v < 1]
    if bad or not 1 <= authors_patterns <= len(PATTERNS):
        raise PosprobeError(
            "bench needs n_train, n_test, epochs, authors_epochs, repeats >= 1 and 1..5 authors_patterns; given "
            + ", ".join(bad or [f"authors_patterns={authors_patterns}"])
        )
    backbone = create_backbone(backbone_name, weights, seed)
    train, test = bench_images(n_train, n_test, image_size, seed, photos)
    tests = {"natural": test, **{k: synthetic_images(k, image_size, seed) for k in SYNTHETIC}}
    config = get_profile("official", epochs=epochs, seed=seed)
    log(f"bench {backbone_name} ({backbone.weights_label}): {len(train)} train, {len(test)} test images")
    _forward_only(backbone, TensorImages(train.images[:2], train.ids[:2], "warmup"), 2, device)  # warm-up

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
    floor, cold, warm = best["a"], best["b"], best["b2"]
    runs_a, runs_b = runs["a"], runs["b"]

    authors, label = _authors_phase(backbone, train, tests, config, epochs, authors_epochs, authors_patterns, settings)
    log(f"(c) authors {authors.wall_s:.1f} s ({label})")
    return BenchResult(
        backbone_name,
        backbone.weights_label,
        len(train),
        len(test),
        image_size,
        feat_size,
        epochs,
        len(PATTERNS),
        torch.get_num_threads(),
        floor,
        cold,
        warm,
        authors,
        label,
        _device_name(device),
        [b.wall_s / a.wall_s for a, b in zip(runs_a, runs_b)],
    )


def _interleaved(backbone, train, tests: dict, config, settings: dict, repeats: int, log) -> dict[str, list[Phase]]:
    """(a), (b) and (b2) ``repeats`` times, interleaved, so a disturbance of the machine falls on all of them."""
    runs: dict[str, list[Phase]] = {"a": [], "b": [], "b2": []}
    for _ in range(repeats):
        runs["a"].append(Phase())
        _floor_pass(backbone, train, tests, settings["encode_batch_size"], settings["device"], runs["a"][-1])
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
    """(a): the encoder alone over every image once, the least any protocol must spend."""
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
    backbone, train, tests: dict, config, epochs: int, authors_epochs: int, authors_patterns: int, settings: dict
) -> tuple[Phase, str]:
    """(c): the authors' loop (encoder in every step, one readout per pattern), run for ``authors_epochs`` x
    ``authors_patterns`` and extrapolated to ``epochs`` x 5 patterns; the phase and how it was obtained."""
    feat_size, image_size, device, seed = (settings[k] for k in ("feat_size", "image_size", "device", "seed"))
    authors = Phase()
    with measure(authors):
        gen = torch.Generator().manual_seed(seed)
        train_s, test_s = 0.0, 0.0
        for pattern in PATTERNS[:authors_patterns]:
            torch.manual_seed(seed)
            readout = Readout(backbone.channels, 3, 1, 0, feat_size, image_size).to(device)
            opt = torch.optim.SGD(
                readout.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
            )
            target = make_target(pattern, image_size, image_size).to(device)
            t0 = _now()
            for _ in range(authors_epochs):
                _authors_epoch(backbone, train, readout, opt, target, config.batch_size, feat_size, device, gen)
            t1 = _now()
            for images in tests.values():
                _authors_test(backbone, images, readout, settings["encode_batch_size"], feat_size, device)
            train_s, test_s = train_s + t1 - t0, test_s + _now() - t1
    measured_wall, measured_cpu = authors.wall_s, authors.cpu_s
    runs, full = authors_epochs * authors_patterns, epochs * len(PATTERNS)
    total = train_s * full / runs + test_s * len(PATTERNS) / authors_patterns
    authors.parts = {
        "measured": measured_wall,
        "per epoch": train_s / runs,
        "test per pattern": test_s / authors_patterns,
    }
    authors.cpu_s = measured_cpu * total / max(measured_wall, 1e-9)
    authors.wall_s = total
    label = (
        f"extrapolated from {authors_epochs} epoch(s) x {authors_patterns} pattern(s)"
        if runs < full
        else "measured in full"
    )
    return authors, label


def _device_name(device: str) -> str:
    """'cpu', or 'cuda (NVIDIA H100 80GB HBM3)': what the timings were measured on."""
    dev = torch.device(device)
    return f"{dev} ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else str(dev)
