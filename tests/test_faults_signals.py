"""OS errors and signals at the command line: one line, the right exit code, no traceback, nothing half-written.

The signal tests run the real CLI in a subprocess and send the real signal; they wait for a line on stderr (never
for a fixed time) before sending it. Where the window to hit is short (results being written, one batch of an
extraction stored), the subprocess patches that step to announce itself and pause, so the signal lands there.
"""

from __future__ import annotations

import errno
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_cli
from posprobe.output import rundir

FAST = [
    "--backbone",
    "posenet",
    "--image-size",
    "32",
    "--feat-size",
    "8",
    "--batch-size",
    "4",
    "--pattern",
    "H",
    "--quiet",
]
MARKER_TIMEOUT = 180  # seconds: a loaded 2-core machine imports torch slowly

# Runs the console entry point after an optional patch (the argv after "-c" is the command line).
PRELUDE = """
import sys, time
{patch}
from posprobe import cli
sys.argv = ["posprobe", *sys.argv[1:]]
cli.main()
"""
# Results being written: the first JSON file of the run directory is written, then the process pauses.
PAUSE_WRITING = """
import posprobe.studies.probe_run as run
_write_json = run.write_json
def write_json(path, obj):
    _write_json(path, obj)
    print("MARK writing", path, file=sys.stderr, flush=True)
    time.sleep(120)
run.write_json = write_json
"""
# An extraction with its first batch stored in the cache, then the process pauses before the next batch.
PAUSE_EXTRACTING = """
import posprobe.features.cache as cache
_encode_batches = cache.encode_batches
def encode_batches(*args, **kwargs):
    for i, batch in enumerate(_encode_batches(*args, **kwargs)):
        if i == 1:
            while not (cache.extraction_in_progress() or (0,))[0]:  # the writer thread has stored batch 0
                time.sleep(0.01)
            print("MARK extracting", cache.extraction_in_progress(), file=sys.stderr, flush=True)
            time.sleep(120)
        yield batch
cache.encode_batches = encode_batches
"""


class Cli:
    """A `posprobe` subprocess whose stderr is read line by line as it comes."""

    def __init__(self, args: list[str], tmp_path: Path, patch: str = ""):
        env = {
            **os.environ,
            "POSPROBE_OFFLINE": "1",
            "POSPROBE_CACHE": str(tmp_path / "cache"),
            "PYTHONUNBUFFERED": "1",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PRELUDE.format(patch=patch), *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, fragment: str) -> None:
        """Block until a stderr line contains ``fragment``; fail if the process ends first or it takes too long."""
        while True:
            try:
                line = self._queue.get(timeout=MARKER_TIMEOUT)
            except queue.Empty:
                self.proc.kill()
                pytest.fail(f"no '{fragment}' on stderr within {MARKER_TIMEOUT} s: {''.join(self.lines)}")
            if line is None:
                pytest.fail(f"ended (exit {self.proc.wait()}) before '{fragment}': {''.join(self.lines)}")
            self.lines.append(line)
            if fragment in line:
                return

    def finish(self) -> tuple[int, str]:
        """(exit code, all of stderr)."""
        try:
            code = self.proc.wait(timeout=MARKER_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        while (line := self._queue.get(timeout=MARKER_TIMEOUT)) is not None:
            self.lines.append(line)
        return code, "".join(self.lines)


def assert_interrupted(code: int, err: str, expected_code: int, out: Path) -> str:
    """The exit code, the one line last on stderr, no traceback, no OUT and no hidden folder beside it."""
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("MARK")]
    assert code == expected_code, err
    assert "Traceback" not in err and "Aborted" not in err, err
    assert lines[-1].startswith(f"posprobe: interrupted: nothing written to {out}"), err
    assert not out.exists()
    if out.parent.exists():
        assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []
    return lines[-1]


def test_ctrl_c_while_training_exits_130_with_one_line(tmp_path):
    """A real run, interrupted once the feature cache has announced its extraction (training follows)."""
    out = tmp_path / "runs" / "r"
    run = Cli(["probe", *FAST, "--epochs", "500", "--out", str(out)], tmp_path)
    run.wait_for("feature cache:")
    run.proc.send_signal(signal.SIGINT)
    code, err = run.finish()
    assert_interrupted(code, err, 130, out)


def test_sigterm_while_results_are_written_leaves_nothing(tmp_path):
    """SIGTERM (timeout, Slurm, Docker) after config.json is in the temp folder: the folder goes, exit 143."""
    out = tmp_path / "r"
    run = Cli(["probe", *FAST, "--epochs", "1", "--no-cache", "--out", str(out)], tmp_path, PAUSE_WRITING)
    run.wait_for("MARK writing")
    assert [p for p in tmp_path.iterdir() if p.name.startswith(f".r.partial-{run.proc.pid}-")]  # it was there
    run.proc.send_signal(signal.SIGTERM)
    code, err = run.finish()
    line = assert_interrupted(code, err, 143, out)
    assert line == f"posprobe: interrupted: nothing written to {out}"


def test_sigint_mid_extraction_says_what_the_cache_keeps(tmp_path):
    out = tmp_path / "r"
    run = Cli(["probe", *FAST, "--epochs", "1", "--out", str(out)], tmp_path, PAUSE_EXTRACTING)
    run.wait_for("MARK extracting")
    run.proc.send_signal(signal.SIGINT)
    code, err = run.finish()
    line = assert_interrupted(code, err, 130, out)
    m = re.fullmatch(
        rf"posprobe: interrupted: nothing written to {re.escape(str(out))}; the feature cache keeps "
        r"(\d+) of (\d+) images and resumes",
        line,
    )
    assert m and 0 < int(m[1]) < int(m[2]), line


# -- in this process: the checks before compute and the OS errors -------------------------------------------------


@pytest.fixture
def no_compute(monkeypatch):
    """Any command that gets past its checks fails the test: they must come before the work."""
    import posprobe.studies.probe_run

    def execute(*args, **kwargs):
        raise AssertionError("compute started")

    monkeypatch.setattr(posprobe.studies.probe_run, "execute", execute)


def test_out_name_too_long_for_its_temp_name_is_refused_before_compute(tmp_path, capsys, monkeypatch, no_compute):
    """245 characters fit a 255-byte file system, but not .NAME.partial-PID-XXXXXXXX (D9: it failed after compute)."""
    out = tmp_path / ("n" * 245)
    code, _, err = run_cli(["probe", *FAST, "--out", str(out)], capsys, monkeypatch)
    assert_one_line_error(code, err, "is too long", "choose a name of at most")
    assert list(tmp_path.iterdir()) == []


def test_parent_folder_name_too_long_is_refused_before_compute(tmp_path, capsys, monkeypatch, no_compute):
    code, _, err = run_cli(["probe", *FAST, "--out", str(tmp_path / ("m" * 300) / "r")], capsys, monkeypatch)
    assert_one_line_error(code, err, "too long")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_under_read_only_folder_is_refused_before_compute(tmp_path, capsys, monkeypatch, no_compute):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, _, err = run_cli(["probe", *FAST, "--out", str(locked / "r")], capsys, monkeypatch)
    finally:
        locked.chmod(0o755)
    assert_one_line_error(code, err, str(locked), "not writable")


@pytest.mark.parametrize("code_", [errno.ENOSPC, errno.EROFS])
def test_os_error_while_writing_results_is_one_line(tmp_path, capsys, monkeypatch, code_):
    """D6: a disk that fills (or turns read-only) while results are written: the path and the reason, exit 2,
    no traceback, no OUT and no temp folder left."""
    import posprobe.studies.probe_run

    def write_json(path, obj):
        raise OSError(code_, os.strerror(code_), str(path))

    monkeypatch.setattr(posprobe.studies.probe_run, "write_json", write_json)
    out = tmp_path / "r"
    code, _, err = run_cli(["probe", *FAST, "--epochs", "1", "--no-cache", "--out", str(out)], capsys, monkeypatch)
    # the temp folder's path is shown as OUT's: the user never named .r.partial-...
    assert_one_line_error(code, err, f"{out / 'config.json'}: {os.strerror(code_)} ({errno.errorcode[code_]})")
    assert list(tmp_path.iterdir()) == []


def test_os_error_without_a_path_names_out(tmp_path, capsys, monkeypatch):
    """A write that fails at close (ENOSPC there carries no file name) still names the run directory."""
    import posprobe.studies.probe_run

    def write_csv(path, rows):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(posprobe.studies.probe_run, "write_csv", write_csv)
    out = tmp_path / "r"
    code, _, err = run_cli(["probe", *FAST, "--epochs", "1", "--no-cache", "--out", str(out)], capsys, monkeypatch)
    assert_one_line_error(code, err, f"{out}: No space left on device (ENOSPC); free space there")
    assert list(tmp_path.iterdir()) == []


def test_usage_errors_keep_exit_2_and_their_message(capsys, monkeypatch):
    code, _, err = run_cli(["probe", "--no-such-option"], capsys, monkeypatch)
    assert code == 2 and "No such option" in err and "Traceback" not in err


# -- the hidden folders of dead processes --------------------------------------------------------------------------


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_partial_folders_of_dead_processes_are_swept(tmp_path, capsys):
    pid = dead_pid()
    stale = tmp_path / f".r.partial-{pid}-abcd1234"
    (stale / "predictions").mkdir(parents=True)
    live = tmp_path / f".r.partial-{os.getppid()}-efgh5678"  # a live process's write in progress is left alone
    live.mkdir()
    other = tmp_path / f".rr.partial-{pid}-abcd1234"  # another --out's
    other.mkdir()
    with rundir.atomic_run_dir(tmp_path / "r") as tmp:
        assert tmp.name.startswith(f".r.partial-{os.getpid()}-")
        (tmp / "metrics.json").write_text("{}")
    assert (tmp_path / "r" / "metrics.json").is_file()
    assert not stale.exists() and live.exists() and other.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"posprobe: removed 1 folder(s) left beside {tmp_path / 'r'} by interrupted runs: {stale.name}"]


def test_overwrite_killed_between_its_renames_gets_the_previous_results_back(tmp_path, capsys):
    """The previous OUT, moved aside as .OUT.old-PID by a process that died before the new one took its place."""
    old = tmp_path / f".r.old-{dead_pid()}"
    old.mkdir()
    (old / "metrics.json").write_text("previous")
    with pytest.raises(rundir.PosprobeError, match="already exists"):
        rundir.check_out_dir(tmp_path / "r", overwrite=False)
    assert (tmp_path / "r" / "metrics.json").read_text() == "previous" and not old.exists()


def test_interrupted_overwrite_keeps_the_previous_results(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "metrics.json").write_text("previous")
    with pytest.raises(KeyboardInterrupt):
        with rundir.atomic_run_dir(out, overwrite=True) as tmp:
            (tmp / "metrics.json").write_text("new")
            raise KeyboardInterrupt
    assert (out / "metrics.json").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 MB tmpfs (root only): its free space is what the test leaves, a real ENOSPC when it runs out."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("this container may not mount a tmpfs")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int) -> None:
    (disk / "filler").write_bytes(bytes(max(0, shutil.disk_usage(disk).free - leave)))


@pytest.mark.parametrize("leave", [0, 80 * 1024])
def test_a_real_full_out_disk_is_one_line(tiny_disk, capsys, monkeypatch, leave):
    """D6 for real: a disk already full is refused before any compute; one that fills while the results (the
    readouts' torch.save included) are written gives the path and ENOSPC; exit 2 either way, nothing left."""
    fill(tiny_disk, leave)
    out = tiny_disk / "r"
    code, _, err = run_cli(["probe", *FAST, "--epochs", "1", "--no-cache", "--out", str(out)], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err and "No space left on device" in err, err
    assert len([line for line in err.splitlines() if line.startswith("posprobe: error:")]) == 1
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["filler"]


def test_saving_tensors_on_a_full_disk_raises_an_os_error(tiny_disk):
    """torch.save's own writer turns ENOSPC into a RuntimeError that no handler reads as a full disk."""
    import torch

    fill(tiny_disk, 16 * 1024)
    with pytest.raises(OSError) as caught:
        rundir.write_torch(tiny_disk / "readouts.pt", {"w": torch.zeros(100_000)})
    assert caught.value.errno == errno.ENOSPC
