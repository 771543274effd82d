"""Run directories: written whole or not at all, never silently overwritten, with environment facts."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from .errors import PosprobeError


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output unless ``overwrite``; called before any work starts."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise PosprobeError(f"output directory {out} already exists; choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise PosprobeError(f"output path {out} exists and is not a directory")
    ancestor = out.parent
    while not ancestor.exists():  # the nearest folder that exists must hold (or become) the output's parent
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise PosprobeError(f"cannot create output directory {out}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise PosprobeError(f"cannot create output directory {out}: {ancestor} is not writable")
    return out


@contextlib.contextmanager
def atomic_run_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out`` and move it into place only if the block succeeds."""
    out = check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _jsonable(obj):
    from .data import display_name  # a file name that is not UTF-8 (caf\xe9.png) is written escaped

    if isinstance(obj, dict):
        return {display_name(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, Path)):
        return display_name(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def write_json(path: Path, obj) -> None:
    """JSON in UTF-8; strings holding the surrogate escapes of a non-UTF-8 file name are written escaped."""
    path.write_text(json.dumps(_jsonable(obj), indent=2) + "\n", encoding="utf-8")


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    """CSV in UTF-8; strings holding the surrogate escapes of a non-UTF-8 file name are written escaped."""
    from .data import display_name

    if not rows:
        path.write_text("", encoding="utf-8")
        return
    cell = lambda v: display_name(v) if isinstance(v, (str, Path)) else v  # noqa: E731
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=[display_name(k) for k in rows[0]])
        writer.writeheader()
        writer.writerows({display_name(k): cell(v) for k, v in row.items()} for row in rows)


def git_commit() -> str | None:
    """The commit of the posprobe source tree, when it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=False)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: str | torch.device = "cpu") -> dict:
    """Versions, device and commit, so a number can be traced to what produced it."""
    import torchvision

    from . import __version__

    dev = torch.device(device)
    facts = {
        "posprobe": __version__, "git_commit": git_commit(), "python": platform.python_version(),
        "platform": platform.platform(), "torch": torch.__version__, "torchvision": torchvision.__version__,
        "numpy": np.__version__, "device": str(dev), "cpu_threads": torch.get_num_threads(),
    }  # fmt: skip
    if dev.type == "cuda":
        facts["cuda_device"] = torch.cuda.get_device_name(dev)
        facts["cuda"] = torch.version.cuda
    try:
        import timm

        facts["timm"] = timm.__version__
    except ImportError:
        pass
    return facts


def resolve_device(device: str) -> str:
    """'auto' -> cuda when available; an explicit device that is absent is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise PosprobeError(f"unknown device '{device}'; expected cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PosprobeError(f"device '{device}' requested but CUDA is not available here; use --device cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise PosprobeError(f"unsupported device '{device}'; expected cpu, cuda, cuda:N or auto")
    return device
