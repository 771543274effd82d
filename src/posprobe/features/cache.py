"""The feature cache: each image set's aligned features, computed once per encoder setting and kept on disk.

The aligned, concatenated features (every level resized to feat_size, exactly what a readout consumes)
depend on the backbone, its weights, the tapped levels, the preprocessing, the image and feature sizes
and the images themselves, and on nothing a study varies (pattern, epoch, readout). An entry is keyed by
a sha256 over all of those, the weights and images by content, so a changed image file, checkpoint or
setting never reuses a stale entry.

An entry holds the aligned features as channel parts (parts.py): a level that alignment upsamples
(VGG16's relu5_3, ResNet's layer3 and layer4) is exactly ``A f A^T`` of its native map ``f``, so it is
stored at native size, which loses nothing and is what training reads anyway. Layout of an entry
``<root>/<key>/``: ``features.bin`` (one row per image: each part's (h, w, c) values in turn, memory-mapped
when read, channels_last in memory), ``progress.json`` while extracting (rows done, so an interrupted
extraction resumes), and ``manifest.json`` (parts, dtype, scales, ids, a sha256 per chunk of rows of
``features.bin``), written last by an atomic rename: an entry without it is incomplete and never read. A lock
file serialises two processes extracting the same entry.

Disks and copies fail silently: a process verifies every entry it reads against its checksums once, before its
first use (one sequential read, a few percent of a study that reads the entry from a warm cache; see
``verify_entry``). A damaged entry (flipped or zeroed bytes, a truncated file, an unreadable manifest) is
reported in one line, moved to ``<root>/damaged/`` and extracted again; ``posprobe cache ls`` lists it and
``posprobe cache clear --damaged`` removes it.

Sizes at the paper's scale (DUT-S train, 10,553 images, 28x28, float16): 18 GB for VGG16 (1472 channels,
relu5_3 at 14x14) and 19 GB for ResNet-152 (3840 channels, layer3 at 14x14 and layer4 at 7x7); aligned
throughout they would be 24 and 64 GB. Values beyond float16's range (65504; a randomly initialised
ResNet-152 reaches 2e8) are never rounded to inf: a part whose first batch comes within 16 times of the
limit is stored divided by a power of two (``part_scale``; the manifest records it); a later batch beyond
that makes the entry float32. Values too small for it are never flushed to zero: a part whose first batch peaks
below 1 is stored multiplied by the power of two that lifts its peak to [1, 2). Features that are not finite
never reach the cache (encode.encode_batches
stops the run). Above ``max_gb``, or when the disk would fill, posprobe streams instead: the encoder re-runs
every epoch (``sources.StreamedSet``) and nothing is written. An entry's file is allocated whole before the
first image (``posix_fallocate``), so a full disk is known at once; a disk that fills anyway (another process
writing) stops the extraction with one line and a resumable entry.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import PosprobeError
from .encode import EncodedSet, encode, encode_batches, unreadable_list
from .parts import Part, PartPlan, plan_parts
from .sources import MemorySource, StreamedSet

CACHE_FORMAT = 4  # 2: channel parts, upsampled levels native, float16 scales; 3: checksums; 4: tiny parts scaled up
DEFAULT_MAX_GB = 32.0
DISK_RESERVE_GB = 2.0  # never leave less than this free
FP16_MAX = 65504.0
HEADROOM = 16.0  # a part's later batches may reach 16x its first batch's peak before the entry becomes float32
# How an image becomes the encoder's input (data.to_tensor + Backbone.forward); part of every key.
PREPROCESSING = (
    "PIL, EXIF orientation applied, RGB, bilinear resize to image_size, /255 -> [0,1], then the backbone's input_norm"
)
CHUNK_BYTES = 64 * 2**20  # features.bin is checksummed in chunks of whole rows of about this size
DAMAGED = "damaged"  # the folder under the cache root where damaged entries are moved aside
GB = 1e9


_EXTRACTING: dict = {}  # the entry this process is extracting now: {"entry": Path, "done": int, "total": int}


def extraction_in_progress() -> tuple[int, int, Path] | None:
    """(images stored, images in the set, entry folder) of the extraction running in this process, if any:
    what an interrupted run can tell the user the cache keeps for the next run to resume from."""
    if not _EXTRACTING:
        return None
    return _EXTRACTING["done"], _EXTRACTING["total"], _EXTRACTING["entry"]


_VERIFIED: set[tuple[str, int, int]] = set()  # (entry folder, data mtime, size) this process has verified


def _size_note(
    backbone, name: str, n: int, feat_size: int, plans: list[PartPlan], dtype: str, size: int, where: Path
) -> str:
    """What an entry will hold and where, said before its extraction starts."""
    native = [f"{p.hi - p.lo} at {p.native_size[0]}x{p.native_size[1]}" for p in plans if p.native_size]
    kept_native = f" (upsampled levels kept native: {', '.join(native)})" if native else ""
    return (
        f"feature cache: {backbone.name} x {name}: {n} image{'s' if n != 1 else ''} x {backbone.channels} "
        f"channels at {feat_size}x{feat_size}{kept_native}, {dtype} = {size / GB:.2f} GB -> {where}"
    )


def _size(n: float) -> str:
    """Bytes in words: '1.7 GB', '3.9 MB'."""
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 1e6:.1f} MB"


def os_reason(err: OSError) -> str:
    """'No space left on device' for an OSError: the reason without Python's decoration."""
    return err.strerror or str(err)


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
    if hasattr(images, "transform_identity"):  # e.g. data.RolledImages: its base images, transformed
        base = dataset_identity(images.base)
        if base is None:
            return None
        return {"base": base, "image_size": base["image_size"], "n": len(images), **images.transform_identity()}
    paths, ids = getattr(images, "paths", None), getattr(images, "ids", None)
    if paths is not None and ids is not None and hasattr(images, "image_size"):
        h = hashlib.sha256()
        for i, p in zip(ids, paths):
            h.update(f"{i}\0{_sha_file(Path(p))}\n".encode("utf-8", "surrogateescape"))  # any file name
        return {"kind": "files", "n": len(paths), "image_size": int(images.image_size), "sha256": h.hexdigest()}
    tensor = getattr(images, "images", None)
    if isinstance(tensor, torch.Tensor) and ids is not None:
        h = hashlib.sha256("\n".join(map(str, ids)).encode("utf-8", "surrogateescape"))
        _sha_tensor(h, tensor)
        return {"kind": "tensor", "n": len(ids), "image_size": int(tensor.shape[-1]), "sha256": h.hexdigest()}
    return None


def feature_key(backbone, images: Dataset, feat_size: int) -> tuple[str, dict] | None:
    """(sha256 key, the canonical identity it hashes) for these features; None if the images have no identity."""
    data = dataset_identity(images)
    if data is None:
        return None
    identity = {
        "format": CACHE_FORMAT,
        "backbone": backbone_identity(backbone),
        "preprocessing": PREPROCESSING,
        "image_size": data["image_size"],
        "feat_size": int(feat_size),
        "images": data,
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest(), identity


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves no stray temporary file in the entry
        raise


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


def rows_per_chunk(row_bytes: int) -> int:
    """Rows per checksummed chunk: whole rows (a damaged chunk names its images), about CHUNK_BYTES each."""
    return max(1, CHUNK_BYTES // max(1, row_bytes))


def chunk_digests(path: Path, row_bytes: int, rows: int, chunks: Sequence[int] | None = None) -> list[str]:
    """sha256 of each chunk of ``rows_per_chunk`` rows of ``path`` (or of the chunks listed), read sequentially
    (~0.7 GB/s on 2 cores, page cache warm: the demo's 0.95 GB of entries in 1.4 s)."""
    per = rows_per_chunk(row_bytes)
    buffer = memoryview(bytearray(per * row_bytes))
    out = []
    with open(path, "rb", buffering=0) as f:
        for i in range(math.ceil(rows / per)) if chunks is None else chunks:
            size = (min(rows, (i + 1) * per) - i * per) * row_bytes
            f.seek(i * per * row_bytes)
            got = f.readinto(buffer[:size])
            out.append(hashlib.sha256(buffer[:got]).hexdigest() if got == size else "short read")
    return out


def entry_damage(d: Path, key: str | None = None) -> str | None:
    """Why the complete-looking entry ``d`` cannot be trusted without reading its data (manifest unreadable or
    not this entry's, data file missing or of the wrong size), or None. An entry without a manifest is
    incomplete, not damaged; one of an older cache format is outdated, not damaged."""
    path = d / "manifest.json"
    if not path.exists():
        return None
    manifest = _read_json(path)
    if not isinstance(manifest, dict) or "format" not in manifest:
        return "manifest.json is unreadable"
    if manifest["format"] != CACHE_FORMAT:
        return None
    try:
        expected = manifest["rows"] * manifest["row"] * np.dtype(manifest["dtype"]).itemsize
        if len(manifest["checksums"]["sha256"]) != math.ceil(
            manifest["rows"] / manifest["checksums"]["rows_per_chunk"]
        ):
            return "manifest.json's checksums do not cover features.bin"
        if key is not None and manifest["key"] != key:
            return "manifest.json belongs to another entry"
    except (KeyError, TypeError, ValueError):
        return "manifest.json lacks its fields"
    data = d / "features.bin"
    if not data.exists():
        return "features.bin is missing"
    size = data.stat().st_size
    if size != expected:
        return f"features.bin holds {size:,} bytes, the manifest says {expected:,}"
    return None


def verify_entry(d: Path, manifest: dict) -> str | None:
    """Why the entry's data does not match its checksums (the damaged chunks and their first images), or None."""
    sums = manifest["checksums"]
    row_bytes = manifest["row"] * np.dtype(manifest["dtype"]).itemsize
    got = chunk_digests(d / "features.bin", row_bytes, manifest["rows"])
    bad = [i for i, (h, want) in enumerate(zip(got, sums["sha256"])) if h != want]
    if not bad:
        return None
    per, ids = sums["rows_per_chunk"], manifest["ids"]
    first = ids[bad[0] * per : (bad[0] + 1) * per]
    return (
        f"features.bin fails its checksum in {len(bad)} of {len(got)} chunks (first: images "
        f"{bad[0] * per}-{bad[0] * per + len(first) - 1}, from {first[0]})"
    )


@dataclass
class CacheEntry:
    """One entry on disk, complete or not."""

    key: str
    path: Path
    manifest: dict | None
    bytes: int
    rows_done: int
    damage: str | None = None  # why it cannot be used (damaged or set aside as such), else None

    @property
    def complete(self) -> bool:
        return self.manifest is not None and self.damage is None

    @property
    def outdated(self) -> bool:
        """Complete, but written by a posprobe with another cache format: never read, only taking space."""
        return self.manifest is not None and self.manifest.get("format") != CACHE_FORMAT


class FeatureCache:
    """Features (as parts) on disk, keyed by content; ``encode`` returns an entry, making it first if needed.

    ``max_gb``: an image set whose features would exceed this is streamed instead of cached.
    ``log``: where the size notes and hits go (default: stderr).
    """

    def __init__(
        self,
        root: str | Path | None = None,
        max_gb: float = DEFAULT_MAX_GB,
        log: Callable[[str], None] | None = _stderr,
    ):
        if max_gb < 0:
            raise PosprobeError(f"--cache-max-gb must be >= 0; given {max_gb}")
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.max_gb = max_gb
        self.log = log or (lambda message: None)

    def entry_dir(self, key: str) -> Path:
        return self.root / key

    # -- reading ------------------------------------------------------------------------------------------
    def load(self, key: str, images: Dataset | None = None) -> EncodedSet | None:
        """The complete entry ``key`` as a memory-mapped EncodedSet (parts float16 or float32), else None.

        Verified against its checksums on this process's first use; a damaged entry is moved aside (None)."""
        d = self.entry_dir(key)
        damage = entry_damage(d, key)
        manifest = None if damage else _read_json(d / "manifest.json")
        if manifest is not None and manifest.get("format") == CACHE_FORMAT:
            damage = self._verify_once(d, manifest)
        if damage:
            self._set_aside(key, damage)
            return None
        if manifest is None or manifest.get("format") != CACHE_FORMAT:
            return None  # absent, incomplete, or written by an older posprobe
        n, row = manifest["rows"], manifest["row"]
        dtype = np.dtype(manifest["dtype"])
        data = d / "features.bin"
        rows = torch.from_numpy(np.memmap(data, dtype=dtype, mode="c", shape=(n, row)))  # copy-on-write: never written
        parts, at = [], 0
        for p in manifest["parts"]:
            c, h, w = p["shape"]
            block = rows[:, at : at + h * w * c].view(n, h, w, c).permute(0, 3, 1, 2)  # (N, c, h, w), channels_last
            parts.append(Part(p["lo"], p["hi"], block, p["native"], p["scale"]))
            at += h * w * c
        name = getattr(images, "name", manifest["image_set"]) if images is not None else manifest["image_set"]
        description = getattr(images, "description", "") if images is not None else manifest.get("description", "")
        return EncodedSet(
            name, parts, manifest["feat_size"], list(manifest["ids"]), list(manifest["skipped"]), description
        )

    @staticmethod
    def _verify_once(d: Path, manifest: dict) -> str | None:
        """verify_entry the first time this process reads this version of the entry's data."""
        stat = (d / "features.bin").stat()
        stamp = (str(d.resolve()), stat.st_mtime_ns, stat.st_size)
        if stamp in _VERIFIED:
            return None
        damage = verify_entry(d, manifest)
        if damage is None:
            _VERIFIED.add(stamp)
        return damage

    def _set_aside(self, key: str, reason: str) -> None:
        """Move a damaged entry to <root>/damaged/ (kept for inspection; 'cache clear --damaged' removes it)."""
        d = self.entry_dir(key)
        dest = self.root / DAMAGED / f"{key}-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
        try:
            dest.parent.mkdir(exist_ok=True)
            (d / "DAMAGED").write_text(reason + "\n")
            os.rename(d, dest)
            where = f"moved aside to {dest}"
        except OSError as err:
            where = f"it could not be moved aside ({os_reason(err)})"
        self.log(f"feature cache entry {key[:12]} is damaged: {reason}; {where}; it is not used")

    @staticmethod
    def layout(backbone, image_size: int, feat_size: int) -> list[PartPlan]:
        """The parts an entry of images of this size holds (levels that alignment upsamples stay native)."""
        return plan_parts(backbone.level_shapes(image_size), feat_size)

    @staticmethod
    def expected_bytes(plans: list[PartPlan], n: int, feat_size: int, itemsize: int = 2) -> int:
        return n * itemsize * sum(math.prod(p.shape(feat_size)) for p in plans)

    # -- the entry point ------------------------------------------------------------------------------------
    def encode(
        self,
        backbone,
        images: Dataset,
        feat_size: int = 28,
        batch_size: int = 16,
        device: str | torch.device = "cpu",
        strict: bool = False,
        num_workers: int | None = None,
        progress: bool = True,
        allow_stream: bool = True,
    ):
        """An EncodedSet backed by the cache (made now if absent), or a StreamedSet when it is too large.

        Without ``allow_stream``, a set too large to cache is encoded in memory (float32) instead.
        """
        name = getattr(images, "name", "images")
        in_memory = functools.partial(
            encode,
            backbone,
            images,
            feat_size,
            batch_size,
            device,
            strict=strict,
            num_workers=num_workers,
            progress=progress,
        )

        def instead(why: str, stream: bool = allow_stream):
            """The features without the cache: streamed (re-encoded every pass) or in memory (float32)."""
            how = "streaming instead (the encoder re-runs every epoch; memory stays constant)"
            self.log(f"{why}: " + (how if stream else f"encoding {name} in memory instead"))
            if stream:
                return StreamedSet(backbone, images, feat_size, device, strict, num_workers, batch_size)
            return in_memory()

        keyed = feature_key(backbone, images, feat_size)
        if keyed is None:
            return instead(f"{name}: images without a content identity are not cached", stream=False)
        key, identity = keyed
        hit = self.load(key, images)
        if hit is not None:
            self._check_strict(hit, strict)
            self.log(f"feature cache hit: {backbone.name} x {name} ({len(hit)} images) [{key[:12]}]")
            return hit
        unwritable = self._unwritable()
        if unwritable:  # a read-only cache, a file, no permission: no reason to stop
            return instead(f"feature cache {self.root} cannot be written ({unwritable})", stream=False)
        plans = self.layout(backbone, identity["image_size"], feat_size)
        refused = self._make_entry(
            key, identity, backbone, images, feat_size, plans, batch_size, device, strict, num_workers, progress
        )
        if refused:
            return instead(refused)
        out = self.load(key, images)
        if out is None:
            raise PosprobeError(f"feature cache entry {self.entry_dir(key)} could not be read back after writing it")
        return out

    def _make_entry(
        self, key: str, identity: dict, backbone, images: Dataset, feat_size: int, plans: list[PartPlan], *extract_args
    ) -> str | None:
        """Extract the entry, in float16 or (when a later batch overflows its scale) float32; or say why the
        cache cannot take it (over --cache-max-gb, the disk too full) so the caller bypasses it."""
        name = getattr(images, "name", "images")
        for dtype in ("float16", "float32"):
            size = self.expected_bytes(plans, len(images), feat_size, np.dtype(dtype).itemsize)
            self.log(_size_note(backbone, name, len(images), feat_size, plans, dtype, size, self.entry_dir(key)))
            free = shutil.disk_usage(self.root).free
            if size > self.max_gb * GB:
                return f"over --cache-max-gb {self.max_gb:g}"
            if free - size < DISK_RESERVE_GB * GB:
                return f"only {_size(free)} free on {self.root}"
            try:
                self._extract(key, identity, backbone, images, feat_size, plans, *extract_args, dtype)
                return None
            except _NoSpace as err:  # the file could not be allocated whole: nothing encoded yet
                if not (self.entry_dir(key) / "progress.json").exists():  # nothing to resume: no empty entry
                    shutil.rmtree(self.entry_dir(key), ignore_errors=True)
                return f"the disk holding {self.root} cannot take {size / GB:.2f} GB ({os_reason(err.cause)})"
            except OSError as err:  # the disk filled (another process) or failed mid-extraction
                kept = extraction_in_progress()
                resumes = f"; it keeps {kept[0]} of {kept[1]} images and resumes" if kept else ""
                raise PosprobeError(
                    f"could not write the feature cache entry {self.entry_dir(key)}: "
                    f"{os_reason(err)}{resumes} (free space, or use --no-cache)"
                ) from err
            except _Overflow as err:
                self.log(
                    f"{backbone.name} features reach {err.peak:.3g}, beyond float16's range even at the scale "
                    "the first batch chose: storing this entry as float32 instead"
                )
        return None

    def _unwritable(self) -> str | None:
        """Why no entry can be written under the root (read-only, a file, no permission), or None."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root):
                return None
        except OSError as err:
            return "a file, not a folder" if self.root.exists() and not self.root.is_dir() else os_reason(err)

    @staticmethod
    def _check_strict(encoded: EncodedSet, strict: bool) -> None:
        if encoded.skipped and strict:
            raise PosprobeError(
                f"unreadable image in {encoded.name}: {unreadable_list(encoded.skipped[:1])} "
                "(--strict stops at the first)"
            )
        if encoded.skipped:
            import warnings

            warnings.warn(
                f"skipped {len(encoded.skipped)} unreadable image(s) in {encoded.name}: "
                f"{unreadable_list(encoded.skipped)}",
                stacklevel=3,
            )

    # -- writing --------------------------------------------------------------------------------------------
    def _extract(
        self,
        key: str,
        identity: dict,
        backbone,
        images: Dataset,
        feat_size: int,
        plans: list[PartPlan],
        batch_size: int,
        device,
        strict: bool,
        num_workers: int | None,
        progress: bool,
        dtype: str = "float16",
    ) -> None:
        """Encode ``images`` into the entry ``key``, resuming a partial one; checksums and the manifest last.

        A float16 entry takes each part's scale from the first batch (``part_scale``); a later batch beyond the
        scaled range raises _Overflow after removing the partial data. A file that cannot be allocated raises
        _NoSpace before any image is encoded.
        """
        d = self.entry_dir(key)
        d.mkdir(parents=True, exist_ok=True)
        with _locked(d / ".lock", log=self.log):
            if (d / "manifest.json").exists():
                if entry_damage(d, key) is None:
                    return  # another process finished it while we waited
                (d / "manifest.json").unlink()  # damaged and not movable aside: extracted again in place
            row = sum(math.prod(p.shape(feat_size)) for p in plans)  # values per image
            data, prog_path = d / "features.bin", d / "progress.json"
            state = _Progress(key, row, *self._open_data(key, data, _read_json(prog_path), len(images), row, dtype))
            started = time.perf_counter()
            try:
                self._store(d, state, backbone, images, feat_size, batch_size, device, num_workers, strict, progress)
            except _Overflow:
                for f in (data, prog_path):
                    f.unlink(missing_ok=True)
                raise
            except BaseException:
                if not prog_path.exists():  # not one image stored: no allocated file left to hold the disk
                    data.unlink(missing_ok=True)
                raise
            self._finish(d, state, identity, backbone, images, plans, feat_size, time.perf_counter() - started)
        self._check_strict(self.load(key, images), strict)

    def _store(
        self,
        d: Path,
        state: _Progress,
        backbone,
        images: Dataset,
        feat_size: int,
        batch_size: int,
        device,
        num_workers: int | None,
        strict: bool,
        progress: bool,
    ) -> None:
        """Encode the images from ``state.done`` on into the entry's rows; each batch's progress record is written
        after its rows, by a writer thread that overlaps the encoder's next batch."""
        from tqdm.auto import tqdm

        n, name = len(images), getattr(images, "name", "images")
        ids = list(getattr(images, "ids", [str(i) for i in range(n)]))
        mm = np.memmap(d / "features.bin", dtype=np.dtype(state.dtype), mode="r+", shape=(n, state.row))

        def write(at: int, rows: np.ndarray | None, record: dict) -> None:
            if rows is not None:
                # the rows are in the file's pages before the progress record says so; a killed process
                # leaves its dirty pages to the kernel, so no msync per batch (which made writes synchronous)
                mm[at : at + len(rows)] = rows
            _write_json_atomic(d / "progress.json", record)
            _EXTRACTING.update(entry=d, done=record["done"], total=n)

        bar = tqdm(
            total=n,
            initial=state.done,
            desc=f"cache {name} with {backbone.name}",
            unit="img",
            disable=None if progress else True,
            leave=False,
        )
        writer = ThreadPoolExecutor(max_workers=1)
        pending = None
        _EXTRACTING.update(entry=d, done=state.done, total=n)
        try:
            for idx, parts, failed in encode_batches(
                backbone, images, feat_size, batch_size, device, num_workers, state.done
            ):
                if strict and failed:
                    raise PosprobeError(
                        f"unreadable image in {name}: {unreadable_list([ids[failed[0]]], images)} "
                        "(--strict stops at the first)"
                    )
                rows = None
                if parts is not None:  # the first batch decides the scales
                    what = f"{backbone.name} x {ids[idx[0]]}"
                    rows, state.scales = _stage_rows(parts, state.row, state.dtype, state.scales, what)
                at = len(state.kept)
                state.kept, state.bad, state.done = state.kept + idx, state.bad + failed, max(idx + failed) + 1
                if pending is not None:
                    pending.result()  # one write in flight at most: memory stays bounded
                pending = writer.submit(write, at, rows, state.record())
                bar.update(len(idx) + len(failed))
            if pending is not None:
                pending.result()
        finally:
            writer.shutdown(wait=True)  # an interrupted run still records every batch it wrote
            bar.close()  # on an exception _EXTRACTING keeps what was stored, for the interrupted run's message
        mm.flush()  # on disk before the manifest declares the entry complete

    def _finish(
        self,
        d: Path,
        state: _Progress,
        identity: dict,
        backbone,
        images: Dataset,
        plans: list[PartPlan],
        feat_size: int,
        seconds: float,
    ) -> None:
        """Drop the rows of unreadable images, take the checksums and write the manifest: the entry is complete."""
        from .. import __version__

        ids = list(getattr(images, "ids", [str(i) for i in range(len(images))]))
        data = d / "features.bin"
        if not state.kept:
            shutil.rmtree(d, ignore_errors=True)
            raise PosprobeError(
                f"none of the {len(images)} image(s) in {getattr(images, 'name', 'images')} could be read: "
                + unreadable_list([ids[i] for i in state.bad], images)
            )
        row_bytes = state.row * np.dtype(state.dtype).itemsize
        os.truncate(data, len(state.kept) * row_bytes)
        manifest = {
            "key": state.key,
            "format": CACHE_FORMAT,
            "identity": identity,
            "rows": len(state.kept),
            "row": state.row,
            "channels": backbone.channels,
            "feat_size": feat_size,
            "dtype": state.dtype,
            "layout": "one row per image: each part's (h, w, c) values in turn",
            "parts": [
                {
                    "lo": p.lo,
                    "hi": p.hi,
                    "shape": list(p.shape(feat_size)),
                    "native": p.native_size is not None,
                    "scale": s,
                }
                for p, s in zip(plans, state.scales or [1.0] * len(plans))
            ],
            "ids": [ids[i] for i in state.kept],
            "skipped": [ids[i] for i in state.bad],
            "checksums": {
                "algorithm": "sha256",
                "rows_per_chunk": rows_per_chunk(row_bytes),
                "sha256": chunk_digests(data, row_bytes, len(state.kept)),
            },
            "image_set": getattr(images, "name", "images"),
            "description": getattr(images, "description", ""),
            "backbone": backbone.name,
            "weights": backbone.weights_label,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(seconds, 3),
            "posprobe": __version__,
            "torch": torch.__version__,
        }
        _write_json_atomic(d / "manifest.json", manifest)
        (d / "progress.json").unlink(missing_ok=True)
        _EXTRACTING.clear()
        stat = data.stat()
        _VERIFIED.add((str(d.resolve()), stat.st_mtime_ns, stat.st_size))  # its checksums were just taken

    def _open_data(
        self, key: str, data: Path, prog: dict | None, n: int, row: int, dtype: str
    ) -> tuple[str, list[float] | None, int, list[int], list[int]]:
        """The entry's data file allocated whole: an interrupted extraction's (which keeps its dtype and scales)
        or a new one. (dtype, scales or None until the first batch, next image, rows kept, rows skipped)."""
        if (
            prog
            and prog.get("key") == key
            and prog.get("row") == row
            and prog.get("dtype") in ("float16", "float32")
            and data.exists()
            and data.stat().st_size == n * row * np.dtype(prog["dtype"]).itemsize
        ):
            self.log(f"resuming an interrupted extraction at image {prog['done']} of {n}")
            with open(data, "r+b") as f:
                _allocate(f, n * row * np.dtype(prog["dtype"]).itemsize)
            return prog["dtype"], prog["scales"], prog["done"], prog["kept"], prog["skipped"]
        try:
            with open(data, "wb") as f:
                f.truncate(n * row * np.dtype(dtype).itemsize)
                _allocate(f, n * row * np.dtype(dtype).itemsize)
        except _NoSpace:
            data.unlink(missing_ok=True)
            raise
        return dtype, None, 0, [], []

    # -- housekeeping ---------------------------------------------------------------------------------------
    def entries(self) -> list[CacheEntry]:
        """Every entry under the root, complete or not, and those moved aside as damaged (their checksums are
        read only by ``verify``; here damage is what the manifest and the file size show)."""
        if not self.root.is_dir():
            return []
        out = []
        aside = self.root / DAMAGED
        folders = [*sorted(self.root.iterdir()), *(sorted(aside.iterdir()) if aside.is_dir() else [])]
        for d in folders:
            if not d.is_dir() or len(d.name) < 64 or d.name == DAMAGED:
                continue
            size = sum(f.stat().st_blocks * 512 for f in d.iterdir() if f.is_file())  # bytes on disk
            manifest = _read_json(d / "manifest.json")
            manifest = manifest if isinstance(manifest, dict) else None
            prog = _read_json(d / "progress.json") or {}
            rows = manifest.get("rows", 0) if manifest else len(prog.get("kept", []))
            damage = entry_damage(d, d.name[:64])
            if d.parent == aside:
                damage = "set aside: " + ((d / "DAMAGED").read_text().strip() if (d / "DAMAGED").exists() else "?")
            out.append(CacheEntry(d.name[:64], d, manifest, size, rows, damage))
        return out

    def verify(self, keys: list[str] | None = None) -> list[tuple[CacheEntry, str | None]]:
        """Every complete entry (or those whose key starts with one of ``keys``) read whole against its
        checksums: (entry, damage or None); damaged entries are moved aside."""
        out = []
        for e in self.entries():
            if e.outdated or e.path.parent.name == DAMAGED or (e.manifest is None and not e.damage):
                continue  # of an older format, already set aside, or still being extracted
            if keys and not any(e.key.startswith(k) for k in keys):
                continue
            damage = e.damage or verify_entry(e.path, e.manifest)
            if damage:
                self._set_aside(e.key, damage)
            out.append((e, damage))
        return out

    def clear(
        self, keys: list[str] | None = None, incomplete_only: bool = False, damaged_only: bool = False
    ) -> tuple[int, int, list[str]]:
        """Remove entries (all, those whose key starts with one of ``keys``, only damaged ones, or only unusable
        ones: incomplete, damaged or of an older cache format).

        Entries another process is writing are left alone. Returns (removed, bytes freed, keys in use).
        """
        removed, freed, busy = 0, 0, []
        for e in self.entries():
            if keys and not any(e.key.startswith(k) for k in keys):
                continue
            if incomplete_only and e.complete and not e.outdated:
                continue
            if damaged_only and not e.damage:
                continue
            with _locked(e.path / ".lock", wait=False) as free:
                if not free:
                    busy.append(e.key)
                    continue
                shutil.rmtree(e.path, ignore_errors=True)
            removed, freed = removed + 1, freed + e.bytes
        return removed, freed, busy


def _peak(x: torch.Tensor) -> float:
    """Largest |value| of a contiguous tensor (inf, or nan when it holds NaN), in one fast pass."""
    lo, hi = torch.aminmax(x.reshape(-1))  # on a flat view: 20x faster than abs().amax() on a 4-D channels_last one
    return max(-float(lo), float(hi)) if not (lo.isnan() or hi.isnan()) else math.nan


def _flat_rows(part: Part) -> torch.Tensor:
    """(b, h * w * c): a channels_last part read as NHWC rows, a view."""
    return part.data.permute(0, 2, 3, 1).reshape(part.data.shape[0], -1)


def _stage_rows(
    parts: list[Part], row: int, dtype: str, scales: list[float] | None, what: str
) -> tuple[np.ndarray, list[float]]:
    """(b, row) rows in the entry's dtype, each part divided by its scale (exact: powers of two), and the scales:
    for float16 the first batch's (``part_scale``), 1 for float32. A float16 batch beyond its scaled range raises
    _Overflow (the entry is then made float32)."""
    flat = [_flat_rows(p) for p in parts]
    if dtype == "float16":
        peaks = [_peak(x) for x in flat]
        if not all(math.isfinite(v) for v in peaks):  # encode_batches stops non-finite features before this
            raise PosprobeError(f"{what}: features are not finite; nothing of them is cached")
        scales = scales or [part_scale(v) for v in peaks]
        if any(not v / s <= FP16_MAX for v, s in zip(peaks, scales)):
            raise _Overflow(max(peaks))
    scales = scales or [1.0] * len(flat)
    staged = torch.empty(len(flat[0]), row, dtype=getattr(torch, dtype))
    at = 0
    for x, scale in zip(flat, scales):
        staged[:, at : at + x.shape[1]] = x if scale == 1.0 else x * (1.0 / scale)
        at += x.shape[1]
    return staged.numpy(), scales


def part_scale(peak: float) -> float:
    """The power of two a part is divided by before float16 storage: 1 while its first batch's peak is between 1
    and HEADROOM times inside float16's range; above, the smallest power of two that brings it there; below 1,
    the power of two that lifts the peak into [1, 2), so that tiny features (a random MobileNet's last stage is
    about 1e-8, under float16's smallest subnormal 6e-8) are not stored as zeros. A power of two changes only the
    exponent: values keep float16's 11 significant bits wherever |value| > 6.1e-5 * scale (below that, float16's
    subnormals: absolute error at most 3e-8 * scale)."""
    if 0 < peak < 1:
        return 2.0 ** math.floor(math.log2(peak))
    if peak * HEADROOM <= FP16_MAX:
        return 1.0
    return 2.0 ** math.ceil(math.log2(peak * HEADROOM / FP16_MAX))


def _allocate(f, size: int) -> None:
    """Reserve the file's blocks now, so a full disk shows before the first image instead of as SIGBUS in a
    memory-mapped write; a file system that cannot preallocate keeps the file sparse."""
    if not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(f.fileno(), 0, size)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise _NoSpace(err) from err
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise


@dataclass
class _Progress:
    """An extraction's state: what progress.json records after every batch, so a killed one resumes."""

    key: str
    row: int
    dtype: str
    scales: list[float] | None  # each part's storage scale, set by the first batch
    done: int  # the next image to encode
    kept: list[int]  # images stored, in row order
    bad: list[int]  # images that could not be read

    def record(self) -> dict:
        return {
            "key": self.key,
            "row": self.row,
            "dtype": self.dtype,
            "scales": self.scales,
            "done": self.done,
            "kept": self.kept,
            "skipped": self.bad,
        }


class _NoSpace(Exception):
    def __init__(self, cause: OSError):
        super().__init__(cause)
        self.cause = cause


class _Overflow(Exception):
    def __init__(self, peak: float):
        super().__init__(peak)
        self.peak = peak


def encode_images(
    backbone,
    images,
    feat_size: int = 28,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    strict: bool = False,
    progress: bool = True,
    cache: FeatureCache | None = None,
    num_workers: int | None = None,
    allow_stream: bool = True,
):
    """Images -> features: via ``cache`` when given (EncodedSet or StreamedSet), else in memory.

    Without ``allow_stream`` a set too large for the cache is encoded in memory (test sets, read once).

    Anything that already is features (an EncodedSet, a feature source or a tensor) passes through.
    """
    if isinstance(images, (EncodedSet, MemorySource, StreamedSet, torch.Tensor)):
        return images
    if backbone is None:
        raise PosprobeError("raw images need a backbone to encode them")
    if cache is None:
        return encode(
            backbone, images, feat_size, batch_size, device, strict=strict, num_workers=num_workers, progress=progress
        )
    return cache.encode(backbone, images, feat_size, batch_size, device, strict, num_workers, progress, allow_stream)
