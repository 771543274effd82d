"""The Ray executor: one task per group, scheduled on any node of a Ray cluster with the resources the spec asks
for (``[resources]``), the feature cache on that node's disk.

Finished cells reach the driver's folder at once through one ``CellStore`` actor pinned to the driver's node: the
only writer, so each cell is written once. A task whose worker dies is retried by Ray (``max_retries``); the
retry asks the store which cells are done and runs only the others, so no finished cell is lost or run twice.
A group whose retries are spent has its unfinished cells recorded as failed, and the sweep goes on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence

from ..errors import PosprobeError
from .sweep_group import cell_result, error_line, group_line, run_group
from .sweep_spec import Group, SweepSpec, cell_id
from .sweep_store import CellStore

LOCAL = "local"  # --ray-address local: start a one-node Ray in this process


def _ray():
    try:
        import ray
    except ImportError:
        raise PosprobeError("--executor ray needs Ray, which is not installed: pip install 'posprobe[ray]'") from None
    return ray


def _reachable(address: str) -> None:
    """Refuse a HOST:PORT where nothing listens at once (Ray itself waits minutes before it gives up)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise PosprobeError(f"--ray-address expects auto, local or HOST:PORT; given '{address}'")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise PosprobeError(
            f"no Ray cluster answers at {address} ({err.strerror or err}); start one there with "
            "'ray start --head --port PORT', or pass --ray-address local to run one in this process"
        ) from None


@contextlib.contextmanager
def ray_session(address: str | None = "auto") -> Iterator:
    """Ray joined to the cluster at ``address`` ('auto': the one this machine runs; 'local' or None: a new
    one-node Ray in this process) for the block; a session this call started is shut down after it. Entered
    before anything is written, so an unreachable cluster leaves no folder behind."""
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    if address is not None and address.startswith("ray://"):
        raise PosprobeError(
            f"--ray-address {address}: Ray Client addresses are not supported (the sweep folder is written by an "
            "actor on the driver's node); run the sweep on a cluster node with --ray-address auto or HOST:PORT"
        )
    if address not in (None, LOCAL, "auto"):
        _reachable(address)
    quiet = dict(logging_level=logging.WARNING, log_to_driver=True)
    try:
        if address in (None, LOCAL):
            ray.init(include_dashboard=False, **quiet)
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PosprobeError(
            f"cannot join a Ray cluster at '{address}': {first}; start one with 'ray start --head' "
            "or pass --ray-address local to run one in this process"
        ) from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _group_task(spec: SweepSpec, group: Group, store, fail_fast: bool) -> tuple[list[dict], float]:
    """One group on a worker: the cells the store does not hold yet (a retried task skips what it finished); how
    each went and how long it ran there."""
    import ray

    started = time.perf_counter()
    ids = {c: cell_id(spec, c) for c in group.cells}
    done = ray.get(store.finished.remote(list(ids.values())))
    left = Group(group.setting, group.train, tuple(c for c in group.cells if ids[c] not in done))
    ray.get(store.event.remote("group started", group=group.label, pid=os.getpid(), cells=len(left.cells)))
    # no progress bars: several workers' at once interleave on the driver's terminal
    results = run_group(spec, left, lambda r: ray.get(store.put.remote(r)), False, fail_fast)
    outcome = [{"status": r["status"], "error": r["error"]} for r in results]  # the store holds the rest
    return outcome, time.perf_counter() - started


def run_ray(
    spec: SweepSpec,
    groups: Sequence[Group],
    store: CellStore,
    address: str | None = None,
    fail_fast: bool = False,
    echo: Callable[[str], None] = print,
) -> None:
    """Run every group as a Ray task on the cluster at ``address``; results are written as they arrive."""
    with ray_session(address) as ray:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        sink = ray.remote(CellStore).options(num_cpus=0, scheduling_strategy=here).remote(str(store.out))
        res = spec.resources
        task = ray.remote(_group_task).options(
            num_cpus=res.num_cpus, num_gpus=res.num_gpus, max_retries=res.max_retries, retry_exceptions=False
        )
        refs = {task.remote(spec, g, sink, fail_fast): g for g in groups}
        pending = list(refs)
        for i in range(1, len(groups) + 1):
            [ref], pending = ray.wait(pending, num_returns=1)
            group = refs[ref]
            try:
                results, seconds = ray.get(ref)
            except ray.exceptions.RayTaskError as err:  # the task raised: --fail-fast, or outside the cells' guards
                if fail_fast:
                    for other in pending:
                        ray.cancel(other, force=True)
                    cause = err.cause
                    raise cause if isinstance(cause, PosprobeError) else PosprobeError(error_line(cause)) from None
                results, seconds = _lost(spec, group, sink, ray, error_line(err.cause)), math.nan
            except ray.exceptions.RayError as err:  # its worker died on every try
                why = f"the Ray worker running this group died after {spec.resources.max_retries} retries: "
                results, seconds = _lost(spec, group, sink, ray, why + error_line(err)), math.nan
                if fail_fast:
                    for other in pending:
                        ray.cancel(other, force=True)
                    raise PosprobeError(f"{group.label}: {why + error_line(err)} (--fail-fast)") from None
            echo(group_line(i, len(groups), group, results, seconds))


def _lost(spec: SweepSpec, group: Group, sink, ray, message: str) -> list[dict]:
    """Record the cells a lost group left unfinished as failed, with why."""
    ids = {c: cell_id(spec, c) for c in group.cells}
    done = ray.get(sink.finished.remote(list(ids.values())))
    results = [cell_result(spec, group, c, "failed", message) for c in group.cells if ids[c] not in done]
    for result in results:
        ray.get(sink.put.remote(result))
    return results
