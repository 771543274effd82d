"""The Ray executor on a real local Ray cluster (``ray start --head`` on 127.0.0.1, two worker CPUs): its table
equals the local executor's, and a worker killed mid-group is retried without losing or repeating a cell."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="Ray is not installed: pip install 'posprobe[ray]'")

BIN = Path(sys.executable).parent

THREE_MODELS = """
name = "three models"
patterns = ["H", "G"]
seeds = 2
[data]
test = ["natural", "black"]
image_size = 64
feat_size = 16
crops_per_photo = 1
[training]
steps = 15
[[backbones]]
name = ["tv:resnet18", "timm:convnext_atto", "timm:vit_tiny_patch16_224"]
weights = "random"
layers = ["all", "each"]
[[readouts]]
kind = "pem"
kernel_size = 1
[[measures]]
kind = "pvf"
"""

# One group long enough to be killed in the middle: each seed's readouts train together, and seeds finish in turn.
ONE_LONG_GROUP = """
name = "kill"
patterns = ["H", "G"]
seeds = 4
[data]
test = ["natural"]
image_size = 64
feat_size = 16
crops_per_photo = 1
[training]
steps = 60
[[backbones]]
name = "tv:resnet18"
weights = "random"
layers = ["all", "each"]
[[readouts]]
kind = "pem"
kernel_size = 3
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    cache = tmp_path_factory.mktemp("cache")
    # Token authentication off for this loopback-only cluster: Ray turns it on by itself once any earlier local
    # ray.init() on this machine left a token in ~/.ray, and a driver started without it is then refused.
    return {
        **os.environ,
        "POSPROBE_OFFLINE": "1",
        "POSPROBE_CACHE": str(cache),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
    }


@pytest.fixture(scope="module")
def cluster(env, tmp_path_factory):
    """A one-node Ray cluster on 127.0.0.1 with 2 CPUs, as `ray start --head` makes one; stopped afterwards."""
    port = _free_port()
    temp = tmp_path_factory.mktemp("ray")
    start = [str(BIN / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2", "--node-ip-address=127.0.0.1"]
    start += ["--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"]
    subprocess.run(start, env=env, check=True, capture_output=True, timeout=120)
    yield f"127.0.0.1:{port}"
    subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def _sweep(spec: Path, out: Path, env: dict, *extra: str, wait: bool = True):
    command = [str(BIN / "posprobe"), "sweep", str(spec), "--out", str(out), "--quiet", *extra]
    if wait:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _table(out: Path) -> dict[tuple[str, str], dict]:
    with open(out / "results.csv", newline="") as f:
        return {(r["cell_id"], r["test_set"]): r for r in csv.DictReader(f)}


def _events(out: Path) -> list[dict]:
    path = out / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_three_models_on_a_ray_cluster_give_the_local_executors_table(cluster, env, tmp_path):
    spec = tmp_path / "three.toml"
    spec.write_text(THREE_MODELS)
    ray_run = _sweep(spec, tmp_path / "ray", env, "--executor", "ray", "--ray-address", cluster)
    assert ray_run.returncode == 0, ray_run.stderr
    local_run = _sweep(spec, tmp_path / "local", env)
    assert local_run.returncode == 0, local_run.stderr
    on_ray, here = _table(tmp_path / "ray"), _table(tmp_path / "local")
    assert on_ray.keys() == here.keys()
    # 3 backbones x (all + 4 or 5 taps) x 2 patterns x 2 seeds x 2 test sets, and each backbone's PVF per level
    assert len({k[0] for k in on_ray}) == len(json.loads((tmp_path / "ray" / "sweep.json").read_text())["cells"])
    assert {r["status"] for r in on_ray.values()} == {"ok"}
    for key, row in on_ray.items():
        # Ray's workers run torch with one thread each, the local run with two: sums are ordered differently, so
        # equal up to float rounding (seen: 1e-6), not bit for bit
        assert float(row["value"]) == pytest.approx(float(here[key]["value"]), abs=1e-3, nan_ok=True), key
    hosts = {r["host"] for r in on_ray.values()}
    assert len(hosts) == 1  # one node; the workers' pids differ from the driver's
    started = [e for e in _events(tmp_path / "ray") if e["event"] == "group started"]
    assert len(started) == 3 and os.getpid() not in {e["pid"] for e in started}


@pytest.mark.slow
def test_a_worker_killed_mid_group_is_retried_and_every_cell_is_done_exactly_once(cluster, env, tmp_path):
    spec, out = tmp_path / "kill.toml", tmp_path / "kill"
    spec.write_text(ONE_LONG_GROUP)
    sweep = _sweep(spec, out, env, "--executor", "ray", "--ray-address", cluster, wait=False)
    killed, done_at_kill = None, 0
    deadline = time.monotonic() + 300
    while killed is None and time.monotonic() < deadline and sweep.poll() is None:
        events = _events(out)
        done_at_kill = sum(e["event"] == "cell ok" for e in events)
        started = [e for e in events if e["event"] == "group started"]
        if done_at_kill and started:  # the first seed's cells are written; the others are training
            killed = started[0]["pid"]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    output, _ = sweep.communicate(timeout=600)
    assert killed is not None, f"the group finished before it could be killed:\n{output}"
    assert sweep.returncode == 0, output
    cells = json.loads((out / "sweep.json").read_text())["cells"]
    assert 0 < done_at_kill < len(cells)  # killed in the middle of the group
    events = _events(out)
    started = [e for e in events if e["event"] == "group started"]
    assert len(started) == 2 and started[1]["pid"] != killed  # Ray ran the task again, in another worker
    before_retry = sum(e["event"] == "cell ok" for e in events[: events.index(started[1])])
    assert before_retry >= done_at_kill
    assert started[1]["cells"] == len(cells) - before_retry  # the retry ran only the cells not yet written
    written = [e["cell"] for e in events if e["event"] == "cell ok"]
    assert sorted(written) == sorted(cells)  # every cell once: none lost, none run twice
    assert not [e for e in events if e["event"] == "duplicate"]
    assert {json.loads((out / "cells" / f"{c}.json").read_text())["status"] for c in cells} == {"ok"}
    assert len({k[0] for k in _table(out)}) == len(cells)
