"""Run directories: written whole or not at all, never silently overwritten, with environment facts."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..data import display_name  # a file name that is not UTF-8 (caf\xe9.png) is written escaped
from ..errors import PosprobeError

# The run directory this process is producing, for an interrupted run's message: {"out": Path, "written": bool}.
_ACTIVE: dict = {}
# The hidden names beside OUT while it is written: .OUT.partial-<pid>-<8 random> and, with --overwrite, .OUT.old-<pid>.
_TMP_SUFFIX = "xxxxxxxx"  # what tempfile.mkdtemp appends to the prefix


def _partial_prefix(name: str, pid: int | None = None) -> str:
    return f".{name}.partial-{os.getpid() if pid is None else pid}-"


def _old_name(name: str, pid: int | None = None) -> str:
    return f".{name}.old-{os.getpid() if pid is None else pid}"


def active_out() -> tuple[Path, bool] | None:
    """(the --out this process checked last, whether it has been moved into place), or None."""
    return (_ACTIVE["out"], _ACTIVE["written"]) if _ACTIVE else None


def _check_names(out: Path, ancestor: Path) -> None:
    """Every component to create, and the hidden names written beside OUT, fit the file system's limits."""
    try:
        name_max = os.pathconf(ancestor, "PC_NAME_MAX")
        path_max = os.pathconf(ancestor, "PC_PATH_MAX")
    except (OSError, ValueError):  # no such limit reported here: the filesystem says so when writing
        return
    hidden = (_partial_prefix(out.name, 2**22) + _TMP_SUFFIX, _old_name(out.name, 2**22))  # the longest pid
    missing = [p.name for p in [out, *out.parents] if p != ancestor and ancestor in p.parents]
    for name in missing[1:]:
        if name_max and len(os.fsencode(name)) > name_max:
            raise PosprobeError(
                f"cannot create output directory {out}: the folder name '{name}' is "
                f"{len(os.fsencode(name))} bytes, over this file system's {name_max}"
            )
    longest = max(len(os.fsencode(n)) for n in hidden)
    if name_max and longest > name_max:
        raise PosprobeError(
            f"output name '{out.name}' is too long: {len(os.fsencode(out.name))} bytes, and its "
            f"temporary name while written ('{hidden[0]}') {longest}, over this file system's "
            f"{name_max}; choose a name of at most {name_max - (longest - len(os.fsencode(out.name)))}"
            " bytes"
        )
    full = len(os.fsencode(str(out.parent.absolute() / hidden[0]))) + 64  # room for the files inside
    if path_max and full > path_max:
        raise PosprobeError(
            f"output path {out} is too long: its files' paths would exceed this file system's {path_max} bytes"
        )


def check_out_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output unless ``overwrite``, and any path the file system would refuse (an unwritable
    or read-only folder, a name too long, its temporary name included); called before any work starts."""
    out = Path(out).expanduser()
    _ACTIVE.clear()
    if out.parent.is_dir():
        _sweep_stale(out)  # first: an --overwrite killed between its renames puts the previous results back
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
        why = "is on a read-only file system" if _read_only(ancestor) else "is not writable"
        raise PosprobeError(f"cannot create output directory {out}: {ancestor} {why}")
    _check_names(out, ancestor)
    _check_room(out, ancestor)
    _ACTIVE.update(out=out, written=False)
    return out


ROOM_PROBE_BYTES = 64 * 1024  # a run directory's JSON, CSV and figures need at least this much


def _check_room(out: Path, ancestor: Path) -> None:
    """Write (and remove) a small file where OUT will go, so a disk that is already full stops the run before
    any compute instead of after it; a disk that fills later still gives one line (the CLI's OS-error handler)."""
    try:
        with tempfile.TemporaryFile(dir=ancestor) as f:
            f.write(bytes(ROOM_PROBE_BYTES))
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise PosprobeError(f"cannot create output directory {out}: {ancestor}: {err.strerror or err}") from None


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or a number that is no pid): leave its folder alone
    return True


def _sweep_stale(out: Path) -> None:
    """Remove the hidden folders that processes which died while writing ``out`` left beside it."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:partial-(\d+)-.+|old-(\d+))")
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return
    stale = []
    for p in siblings:
        m = pattern.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink():
            pid = int(m.group(1) or m.group(2))
            if pid != os.getpid() and not _pid_alive(pid):
                stale.append(p)
    if not stale:
        return
    for p in stale:
        if p.name.startswith(f".{out.name}.old-") and not out.exists():
            p.rename(out)  # an --overwrite killed between its two renames: the previous results go back in place
        else:
            shutil.rmtree(p, ignore_errors=True)
    print(
        f"posprobe: removed {len(stale)} folder(s) left beside {out} by interrupted runs: "
        + ", ".join(p.name for p in stale),
        file=sys.stderr,
    )


def _outside_name(err: OSError, tmp: Path, out: Path) -> OSError:
    """The error with the temporary folder's path shown as OUT's (the user never named .OUT.partial-...)."""
    if err.errno is None:
        return err
    names = [
        str(out / Path(f).relative_to(tmp)) if isinstance(f, str) and Path(f).is_relative_to(tmp) else f
        for f in (err.filename, err.filename2)
    ]
    if names[0] is None:
        names[0] = str(out)
    return OSError(err.errno, err.strerror or str(err), names[0], None, names[1])


@contextlib.contextmanager
def atomic_run_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out`` and move it into place only if the block succeeds.

    On any exception (an OS error, KeyboardInterrupt, the SIGTERM the CLI turns into one) the temporary folder
    is removed and an overwritten OUT keeps its previous contents; folders that killed processes left are swept.
    OS errors name OUT's paths, not the temporary folder's."""
    out = check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(out.name), dir=out.parent))
    old = None
    try:
        try:
            yield tmp
        except OSError as err:
            shown = _outside_name(err, tmp, out)
            if shown is err:
                raise
            raise shown from err
        if out.exists():
            old = out.with_name(_old_name(out.name))
            out.rename(old)
        tmp.rename(out)
        if _ACTIVE.get("out") == out:
            _ACTIVE["written"] = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if old is not None and old.exists() and not out.exists():
            old.rename(out)  # interrupted between the two renames: the previous results stay
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _jsonable(obj):
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


def replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` beside ``path``, then rename it over ``path``: a reader never sees a half-written file, and a
    failure (a full disk) leaves no temporary one behind."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj) -> None:
    """JSON in UTF-8; strings holding the surrogate escapes of a non-UTF-8 file name are written escaped."""
    path.write_text(json.dumps(_jsonable(obj), indent=2) + "\n", encoding="utf-8")


def write_torch(path: Path, obj) -> None:
    """torch.save through a buffer: a full disk raises OSError (ENOSPC), not the RuntimeError torch.save's own
    writer gives, so the CLI reports it in one line."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path.write_bytes(buffer.getbuffer())


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    """CSV in UTF-8; strings holding the surrogate escapes of a non-UTF-8 file name are written escaped."""
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
        out = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def markdown_report(
    title: str, facts: Sequence[str], tables: Sequence[str], notes: Sequence[str] = (), figures: Sequence[str] = ()
) -> str:
    """A run's report.md: a title, its settings and data as a list, each table as printed (monospace), notes
    (definitions, the stated test) and the figures it wrote."""
    lines = [f"# {title}", ""] + [f"- {f}" for f in facts] + [""]
    for table in tables:
        lines += ["```", table, "```", ""]
    lines += [n for note in notes for n in (note, "")]
    lines += [f for name in figures for f in (f"![{Path(name).stem}]({name})", "")]
    return "\n".join(lines)


def environment(device: str | torch.device = "cpu") -> dict:
    """Versions, device and commit, so a number can be traced to what produced it."""
    import torchvision

    from .. import __version__

    dev = torch.device(device)
    facts = {
        "posprobe": __version__,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "device": str(dev),
        "cpu_threads": torch.get_num_threads(),
    }
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
