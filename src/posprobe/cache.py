"""The feature cache: each image set's aligned features, computed once per encoder setting and kept on disk.

The aligned, concatenated features (every level resized to feat_size, exactly what a readout consumes)
depend on the backbone, its weights, the tapped levels, the preprocessing, the image and feature sizes
and the images themselves, and on nothing a study varies (pattern, epoch, readout). An entry is keyed by
a sha256 over all of those, the weights and images by content, so a changed image file, checkpoint or
setting never reuses a stale entry.

Layout of an entry ``<root>/<key>/``: ``features.bin`` (float16, rows of (fs, fs, C), memory-mapped when
read: the in-memory layout is channels_last), ``progress.json`` while extracting (rows done, so an
interrupted extraction resumes), and ``manifest.json``, written last by an atomic rename: an entry without
it is incomplete and never read. A lock file serialises two processes extracting the same entry.

Sizes at the paper's scale (DUT-S train, 10,553 images, 28x28, float16): about 24 GB for VGG16 (1472
channels) and 64 GB for ResNet-152 (3840). Features beyond float16's range (65504; a randomly initialised
ResNet-152 reaches 1e8) are never rounded to inf: such an entry is stored as float32 instead, twice the size,
and the manifest says so. Above ``max_gb``, or when the disk would fill, posprobe streams
instead: the encoder re-runs every epoch (``sources.StreamedSet``) and nothing is written.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import PosprobeError
from .features import EncodedSet, encode, encode_batches, unreadable_list

CACHE_FORMAT = 1
DEFAULT_MAX_GB = 32.0
DISK_RESERVE_GB = 2.0  # never leave less than this free
FP16_MAX = 65504.0
# How an image becomes the encoder's input (data.to_tensor + Backbone.forward); part of every key.
PREPROCESSING = "PIL RGB, bilinear resize to image_size, /255 -> [0,1], then the backbone's input_norm"
GB = 1e9


def default_cache_dir() -> Path:
    """$POSPROBE_CACHE, else ~/.cache/posprobe."""
    env = os.environ.get("POSPROBE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "posprobe"


def _stderr(message: str) -> None:
    print(f"posprobe: {message}", file=sys.stderr)


def _sha_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _sha_tensor(h, t: torch.Tensor) -> None:
    a = t.detach().cpu().contiguous()
    h.update(f"{tuple(a.shape)}{a.dtype}".encode())
    if a.numel():
        h.update(a.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, without a copy


def weights_digest(backbone) -> str:
    """sha256 over every parameter and buffer of the backbone (by name): random, seeded, named or file."""
    digest = getattr(backbone, "_posprobe_weights_digest", None)
    if digest is None:
        h = hashlib.sha256()
        for name, t in backbone.extractor.state_dict().items():
            h.update(name.encode())
            _sha_tensor(h, t)
        digest = h.hexdigest()
        object.__setattr__(backbone, "_posprobe_weights_digest", digest)  # computed once per backbone
    return digest


def backbone_identity(backbone) -> dict:
    """Everything about the encoder that determines its features."""
    return {
        "name": backbone.name,
        "weights": str(backbone.weights),
        "weights_sha256": weights_digest(backbone),
        "structure_sha256": hashlib.sha256(repr(backbone.extractor).encode()).hexdigest(),
        "levels": [[lv.name, lv.channels, lv.stride] for lv in backbone.levels],
        "input_norm": backbone.input_norm,
        "padding": str(getattr(backbone, "padding", None)),  # --backbone-padding surgery, if any
        "pos_embed": str(getattr(backbone, "pos_embed_note", None)),  # --pos-embed, if any
        "mean": [round(float(v), 8) for v in backbone.mean.flatten()],
        "std": [round(float(v), 8) for v in backbone.std.flatten()],
    }


def dataset_identity(images: Dataset) -> dict | None:
    """The images by content: every file's sha256 (folders) or the tensor's bytes; None if unknown."""
    if hasattr(images, "cache_identity"):
        return images.cache_identity()
    paths, ids = getattr(images, "paths", None), getattr(images, "ids", None)
    if paths is not None and ids is not None and hasattr(images, "image_size"):
        h = hashlib.sha256()
        for i, p in zip(ids, paths):
            h.update(f"{i}\0{_sha_file(Path(p))}\n".encode())
        return {"kind": "files", "n": len(paths), "image_size": int(images.image_size), "sha256": h.hexdigest()}
    tensor = getattr(images, "images", None)
    if isinstance(tensor, torch.Tensor) and ids is not None:
        h = hashlib.sha256("\n".join(map(str, ids)).encode())
        _sha_tensor(h, tensor)
        return {"kind": "tensor", "n": len(ids), "image_size": int(tensor.shape[-1]), "sha256": h.hexdigest()}
    return None


def feature_key(backbone, images: Dataset, feat_size: int) -> tuple[str, dict] | None:
    """(sha256 key, the canonical identity it hashes) for these features; None if the images have no identity."""
    data = dataset_identity(images)
    if data is None:
        return None
    identity = {"format": CACHE_FORMAT, "backbone": backbone_identity(backbone), "preprocessing": PREPROCESSING,
                "image_size": data["image_size"], "feat_size": int(feat_size), "images": data}  # fmt: skip
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest(), identity


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _locked(path: Path, wait: bool = True, log: Callable[[str], None] | None = None) -> Iterator[bool]:
    """An exclusive lock on ``path`` (fcntl); yields False if ``wait`` is False and another process holds it."""
    try:
        import fcntl
    except ImportError:  # no advisory locks here: proceed unlocked
        yield True
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            if log:
                log(f"waiting for another posprobe process writing {path.parent.name[:12]}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class CacheEntry:
    """One entry on disk, complete or not."""

    key: str
    path: Path
    manifest: dict | None
    bytes: int
    rows_done: int

    @property
    def complete(self) -> bool:
        return self.manifest is not None


class FeatureCache:
    """Aligned features on disk, keyed by content; ``encode`` returns an entry, making it first if needed.

    ``max_gb``: an image set whose features would exceed this is streamed instead of cached.
    ``log``: where the size notes and hits go (default: stderr).
    """

    def __init__(self, root: str | Path | None = None, max_gb: float = DEFAULT_MAX_GB,
                 log: Callable[[str], None] | None = _stderr):  # fmt: skip
        if max_gb < 0:
            raise PosprobeError(f"--cache-max-gb must be >= 0; given {max_gb}")
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.max_gb = max_gb
        self.log = log or (lambda message: None)

    def entry_dir(self, key: str) -> Path:
        return self.root / key

    # -- reading ------------------------------------------------------------------------------------------
    def load(self, key: str, images: Dataset | None = None) -> EncodedSet | None:
        """The complete entry ``key`` as a memory-mapped EncodedSet (float16 or float32, channels_last), else None."""
        d = self.entry_dir(key)
        manifest = _read_json(d / "manifest.json")
        if manifest is None or manifest.get("key") != key:
            return None
        n, fs, c = manifest["rows"], manifest["feat_size"], manifest["channels"]
        dtype = np.dtype(manifest.get("dtype", "float16"))
        data = d / "features.bin"
        if not data.exists() or data.stat().st_size != n * fs * fs * c * dtype.itemsize:
            return None  # damaged: treat as absent
        mm = np.memmap(data, dtype=dtype, mode="c", shape=(n, fs, fs, c))  # copy-on-write: never written
        features = torch.from_numpy(mm).permute(0, 3, 1, 2)  # (N, C, fs, fs), channels_last strides
        name = getattr(images, "name", manifest["image_set"]) if images is not None else manifest["image_set"]
        description = getattr(images, "description", "") if images is not None else manifest.get("description", "")
        levels = tuple(tuple(s) for s in manifest["levels"]) or None
        return EncodedSet(name, features, list(manifest["ids"]), list(manifest["skipped"]), description, levels=levels)

    def expected_bytes(self, backbone, images: Dataset, feat_size: int, itemsize: int = 2) -> int:
        return len(images) * backbone.channels * feat_size * feat_size * itemsize

    # -- the entry point ------------------------------------------------------------------------------------
    def encode(self, backbone, images: Dataset, feat_size: int = 28, batch_size: int = 16,
               device: str | torch.device = "cpu", strict: bool = False, num_workers: int | None = None,
               progress: bool = True, allow_stream: bool = True):  # fmt: skip
        """An EncodedSet backed by the cache (made now if absent), or a StreamedSet when it is too large.

        Without ``allow_stream``, a set too large to cache is encoded in memory (float32) instead.
        """
        from .sources import StreamedSet

        keyed = feature_key(backbone, images, feat_size)
        name = getattr(images, "name", "images")
        if keyed is None:
            self.log(f"{name}: images without a content identity are not cached; encoding in memory")
            return encode(backbone, images, feat_size, batch_size, device, strict=strict, num_workers=num_workers,
                          progress=progress)  # fmt: skip
        key, identity = keyed
        hit = self.load(key, images)
        if hit is not None:
            self._check_strict(hit, strict)
            self.log(f"feature cache hit: {backbone.name} x {name} ({len(hit)} images) [{key[:12]}]")
            return hit
        self.root.mkdir(parents=True, exist_ok=True)
        for dtype in ("float16", "float32"):
            size = self.expected_bytes(backbone, images, feat_size, np.dtype(dtype).itemsize)
            self.log(f"feature cache: {backbone.name} x {name}: {len(images)} images x {backbone.channels} channels "
                     f"x {feat_size}x{feat_size} {dtype} = {size / GB:.2f} GB -> {self.entry_dir(key)}")  # fmt: skip
            free = shutil.disk_usage(self.root).free
            too_big = size > self.max_gb * GB
            if too_big or free - size < DISK_RESERVE_GB * GB:
                why = (f"over --cache-max-gb {self.max_gb:g}" if too_big
                       else f"only {free / GB:.1f} GB free on {self.root}")  # fmt: skip
                if allow_stream:
                    self.log(f"{why}: streaming instead (the encoder re-runs every epoch; memory stays constant)")
                    return StreamedSet(backbone, images, feat_size, device, strict, num_workers, batch_size)
                self.log(f"{why}: encoding in memory instead")
                return encode(backbone, images, feat_size, batch_size, device, strict=strict,
                              num_workers=num_workers, progress=progress)  # fmt: skip
            double = 2 * size if dtype == "float16" else size
            fp32_fits = double <= self.max_gb * GB and free - double >= DISK_RESERVE_GB * GB
            try:
                self._extract(key, identity, backbone, images, feat_size, batch_size, device, strict, num_workers,
                              progress, dtype, fp32_fits)  # fmt: skip
                break
            except _Overflow as err:
                self.log(f"{backbone.name} features reach {err.peak:.3g}, beyond float16's range ({FP16_MAX:g}): "
                         "storing this entry as float32 instead")  # fmt: skip
        out = self.load(key, images)
        if out is None:
            raise PosprobeError(f"feature cache entry {self.entry_dir(key)} could not be read back after writing it")
        return out

    @staticmethod
    def _check_strict(encoded: EncodedSet, strict: bool) -> None:
        if encoded.skipped and strict:
            raise PosprobeError(f"unreadable image in {encoded.name}: {encoded.skipped[0]} (--strict stops at the first)")
        if encoded.skipped:
            import warnings

            warnings.warn(f"skipped {len(encoded.skipped)} unreadable image(s) in {encoded.name}: "
                          f"{unreadable_list(encoded.skipped)}", stacklevel=3)  # fmt: skip

    # -- writing --------------------------------------------------------------------------------------------
    def _extract(self, key: str, identity: dict, backbone, images: Dataset, feat_size: int, batch_size: int,
                 device, strict: bool, num_workers: int | None, progress: bool, dtype: str = "float16",
                 fp32_fits: bool = True) -> None:  # fmt: skip
        """Encode ``images`` into the entry ``key``, resuming a partial one; the manifest is written last.

        A float16 entry that meets a value beyond float16's range in its first batch becomes float32 on the
        spot (if ``fp32_fits``); later, it raises _Overflow after removing the partial data.
        """
        from tqdm.auto import tqdm

        from . import __version__

        d = self.entry_dir(key)
        d.mkdir(parents=True, exist_ok=True)
        with _locked(d / ".lock", log=self.log):
            if (d / "manifest.json").exists():
                return  # another process finished it while we waited
            n, c, fs = len(images), backbone.channels, feat_size
            row, np_dtype = fs * fs * c, np.dtype(dtype)
            data, prog_path = d / "features.bin", d / "progress.json"
            prog = _read_json(prog_path)
            if prog and prog.get("key") == key and prog.get("dtype") == "float32" and dtype == "float16":
                dtype, np_dtype = "float32", np.dtype("float32")  # an interrupted float32 entry: keep its dtype
            if (prog and prog.get("key") == key and prog.get("row") == row and prog.get("dtype") == dtype
                    and data.exists() and data.stat().st_size == n * row * np_dtype.itemsize):  # fmt: skip
                start, kept, bad, shapes = prog["done"], prog["kept"], prog["skipped"], prog["levels"]
                self.log(f"resuming an interrupted extraction at image {start} of {n}")
            else:
                with open(data, "wb") as f:
                    f.truncate(n * row * np_dtype.itemsize)  # sparse until written
                start, kept, bad, shapes = 0, [], [], []
            mm = np.memmap(data, dtype=np_dtype, mode="r+", shape=(n, fs, fs, c))
            ids = list(getattr(images, "ids", [str(i) for i in range(n)]))
            started = time.perf_counter()
            bar = tqdm(total=n, initial=start, desc=f"cache {getattr(images, 'name', 'images')} with {backbone.name}",
                       unit="img", disable=None if progress else True, leave=False)  # fmt: skip

            def write(at: int, rows: np.ndarray | None, record: dict) -> None:
                """In the writer thread: rows to the file, then the progress record that says so."""
                if rows is not None:
                    # the rows are in the file's pages before the progress record says so; a killed process
                    # leaves its dirty pages to the kernel, so no msync per batch (which made writes synchronous)
                    mm[at : at + len(rows)] = rows
                _write_json_atomic(prog_path, record)

            writer = ThreadPoolExecutor(max_workers=1)  # file writes overlap the encoder's next batch
            pending = None
            try:
                for idx, aligned, failed, level_shapes in encode_batches(backbone, images, fs, batch_size, device,
                                                                         num_workers, start):  # fmt: skip
                    if strict and failed:
                        raise PosprobeError(f"unreadable image in {getattr(images, 'name', 'images')}: "
                                            f"{ids[failed[0]]} (--strict stops at the first)")  # fmt: skip
                    rows = None
                    if aligned is not None:
                        if dtype == "float16":
                            peak = float(aligned.abs().amax())
                            if not peak <= FP16_MAX:  # also catches inf; NaN passes, as it would in memory
                                if kept or bad or not fp32_fits:
                                    raise _Overflow(peak)
                                self.log(f"{backbone.name} features reach {peak:.3g}, beyond float16's range "
                                         f"({FP16_MAX:g}): storing this entry as float32 (2x the size)")  # fmt: skip
                                del mm  # nothing written yet: switch the entry to float32, no encoder work lost
                                dtype, np_dtype = "float32", np.dtype("float32")
                                with open(data, "wb") as f:
                                    f.truncate(n * row * np_dtype.itemsize)
                                mm = np.memmap(data, dtype=np_dtype, mode="r+", shape=(n, fs, fs, c))
                        rows = aligned.cpu().permute(0, 2, 3, 1).to(getattr(torch, dtype)).numpy()  # (b, fs, fs, C)
                        shapes = [list(s) for s in level_shapes]
                    at = len(kept)
                    kept, bad = kept + idx, bad + failed
                    record = {"key": key, "row": row, "dtype": dtype, "done": max(idx + failed) + 1, "kept": kept,
                              "skipped": bad, "levels": shapes}  # fmt: skip
                    if pending is not None:
                        pending.result()  # one write in flight at most: memory stays bounded
                    pending = writer.submit(write, at, rows, record)
                    bar.update(len(idx) + len(failed))
                if pending is not None:
                    pending.result()
            except _Overflow:
                writer.shutdown(wait=True)
                del mm
                for f in (data, prog_path):
                    f.unlink(missing_ok=True)
                raise
            finally:
                writer.shutdown(wait=True)  # an interrupted run still records every batch it wrote
                bar.close()
            mm.flush()  # on disk before the manifest declares the entry complete
            del mm
            if not kept:
                shutil.rmtree(d, ignore_errors=True)
                raise PosprobeError(f"none of the {n} image(s) in {getattr(images, 'name', 'images')} could be read: "
                                    + unreadable_list([ids[i] for i in bad], images))  # fmt: skip
            os.truncate(data, len(kept) * row * np_dtype.itemsize)  # drop the rows of unreadable images
            manifest = {
                "key": key, "format": CACHE_FORMAT, "identity": identity, "rows": len(kept), "channels": c,
                "feat_size": fs, "dtype": dtype, "layout": "N,H,W,C", "ids": [ids[i] for i in kept],
                "skipped": [ids[i] for i in bad], "levels": shapes, "image_set": getattr(images, "name", "images"),
                "description": getattr(images, "description", ""), "backbone": backbone.name,
                "weights": backbone.weights_label, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "seconds": round(time.perf_counter() - started, 3), "posprobe": __version__,
                "torch": torch.__version__,
            }  # fmt: skip
            _write_json_atomic(d / "manifest.json", manifest)
            prog_path.unlink(missing_ok=True)
        self._check_strict(self.load(key, images), strict)

    # -- housekeeping ---------------------------------------------------------------------------------------
    def entries(self) -> list[CacheEntry]:
        """Every entry under the root, complete or not."""
        if not self.root.is_dir():
            return []
        out = []
        for d in sorted(self.root.iterdir()):
            if not d.is_dir() or len(d.name) != 64:
                continue
            size = sum(f.stat().st_blocks * 512 for f in d.iterdir() if f.is_file())  # bytes on disk
            manifest = _read_json(d / "manifest.json")
            prog = _read_json(d / "progress.json") or {}
            rows = manifest["rows"] if manifest else len(prog.get("kept", []))
            out.append(CacheEntry(d.name, d, manifest, size, rows))
        return out

    def total_bytes(self) -> int:
        return sum(e.bytes for e in self.entries())

    def clear(self, keys: list[str] | None = None, incomplete_only: bool = False) -> tuple[int, int, list[str]]:
        """Remove entries (all, those whose key starts with one of ``keys``, or only incomplete ones).

        Entries another process is writing are left alone. Returns (removed, bytes freed, keys in use).
        """
        removed, freed, busy = 0, 0, []
        for e in self.entries():
            if keys and not any(e.key.startswith(k) for k in keys):
                continue
            if incomplete_only and e.complete:
                continue
            with _locked(e.path / ".lock", wait=False) as free:
                if not free:
                    busy.append(e.key)
                    continue
                shutil.rmtree(e.path, ignore_errors=True)
            removed, freed = removed + 1, freed + e.bytes
        return removed, freed, busy


class _Overflow(Exception):
    def __init__(self, peak: float):
        super().__init__(peak)
        self.peak = peak


def encode_images(backbone, images, feat_size: int = 28, batch_size: int = 16, device: str | torch.device = "cpu",
                  strict: bool = False, progress: bool = True, cache: FeatureCache | None = None,
                  num_workers: int | None = None, allow_stream: bool = True):  # fmt: skip
    """Images -> features: via ``cache`` when given (EncodedSet or StreamedSet), else in memory.

    Without ``allow_stream`` a set too large for the cache is encoded in memory (test sets, read once).

    Anything that already is features (an EncodedSet, a feature source or a tensor) passes through.
    """
    from .sources import MemorySource, StreamedSet

    if isinstance(images, (EncodedSet, MemorySource, StreamedSet, torch.Tensor)):
        return images
    if backbone is None:
        raise PosprobeError("raw images need a backbone to encode them")
    if cache is None:
        return encode(backbone, images, feat_size, batch_size, device, strict=strict, num_workers=num_workers,
                      progress=progress)  # fmt: skip
    return cache.encode(backbone, images, feat_size, batch_size, device, strict, num_workers, progress, allow_stream)
