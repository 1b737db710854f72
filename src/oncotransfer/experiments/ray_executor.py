"""The Ray executor: each pending grid run is one Ray task with the grid's ``resources`` (CPUs, GPUs per run).

A task trains into a temporary folder on its node and returns the run directory as ``{relative path: bytes}``;
the driver writes it under ``GRID_DIR/runs/RUN_ID`` atomically (a hidden temporary folder, then a rename), so
nodes need no shared filesystem and an interrupted grid never holds a half-written run: rerunning it resumes
like the local executor (runs with a metrics.json are skipped). Tasks run ``grid.run_one``, the very code of
the local executor. The first pending run of each frozen backbone runs alone before the rest fan out, so the
feature cache of the node it ran on is filled once rather than by every task at the same time.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from oncotransfer.errors import ConfigError, MissingExtraError, OncoError
from oncotransfer.experiments.schedule import LeadersFirst

if TYPE_CHECKING:
    from oncotransfer.config import ExperimentConfig
    from oncotransfer.experiments.grid import GridRun, GridSpec

_MEMO: dict[str, Any] = {"token": None, "data": {}}  # per worker process: loaded data of the current grid


def _import_ray():
    try:
        import ray
    except ImportError:
        raise MissingExtraError("--executor ray needs Ray: pip install 'oncotransfer[ray]'") from None
    return ray


def _task(cfg: ExperimentConfig, run_id: str, run_reports: bool, token: str,
          cpus: float) -> tuple[dict[str, bytes], float, str]:
    """Run one grid run in a temporary folder; return its files, seconds and the node (address/id)."""
    import torch

    from oncotransfer.experiments.grid import run_one
    if _MEMO["token"] != token:  # a new grid: drop the last one's images (they may have changed on disk)
        _MEMO.update(token=token, data={})
    torch.set_num_threads(max(1, math.ceil(cpus)))
    tmp = Path(tempfile.mkdtemp(prefix="oncotransfer_ray_"))
    try:
        t0 = time.perf_counter()
        run_one(cfg, tmp / run_id, run_reports, _MEMO["data"])
        seconds = time.perf_counter() - t0
        root = tmp / run_id
        files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    import ray
    return files, seconds, f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:6]}"


def write_run_files(run_dir: Path, files: dict[str, bytes]) -> None:
    """Write a run directory atomically: into a hidden sibling folder, then one rename into place."""
    tmp = run_dir.parent / f".{run_dir.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    for rel, data in files.items():
        path = tmp / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise ValueError(f"run file {rel!r} escapes the run directory")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    if run_dir.exists():  # a half-made run left by an interrupted local executor (it has no metrics.json)
        shutil.rmtree(run_dir)
    os.replace(tmp, run_dir)


def _check_fits(ray, resources: dict[str, float]) -> None:
    """A task no node can hold would wait forever: fail up front instead."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if not any(r.get("CPU", 0) >= resources["cpus"] and r.get("GPU", 0) >= resources["gpus"] for r in nodes):
        have = ", ".join(f"{r.get('CPU', 0):g} CPU/{r.get('GPU', 0):g} GPU" for r in nodes) or "no nodes"
        raise ConfigError(f"resources: {resources['cpus']:g} CPU and {resources['gpus']:g} GPU per run fit no node "
                          f"of the Ray cluster ({have}); lower the grid's resources or add a bigger node")


def run_ray(spec: GridSpec, grid_dir: Path, runs: list[GridRun], *, workers: int | None = None,
            on_run_end: Callable[[GridRun, Path], None] | None = None,
            log: Callable[[str], None] | None = None, address: str | None = None) -> None:
    """Pending runs as Ray tasks on the cluster at ``address`` (None: RAY_ADDRESS, a cluster started on this
    machine, else a new local instance; "auto" allowed). ``workers`` caps the runs in flight (default: as many
    as the cluster's resources hold). Results are written as they finish; finished runs are skipped."""
    from oncotransfer.experiments.grid import pending_runs
    ray = _import_ray()
    say = log or (lambda s: None)
    pending = pending_runs(grid_dir, runs)
    if not pending:
        return
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers}: give a whole number >= 1, or leave it out (no cap)")
    started = not ray.is_initialized()
    if started:
        kw: dict[str, Any] = {"include_dashboard": False} if address is None else {}
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, **kw)
        except ConnectionError as e:
            raise ConfigError(f"--address {address}: cannot connect to a Ray cluster ({e})") from None
    res = spec.resources
    task = ray.remote(_task).options(num_cpus=res["cpus"], num_gpus=res["gpus"])
    token = os.urandom(8).hex()
    order = LeadersFirst(pending)
    inflight: dict[Any, GridRun] = {}
    done = len(runs) - len(pending)
    try:
        _check_fits(ray, res)
        say(f"ray: {len(pending)} run(s) to do, {res['cpus']:g} CPU / {res['gpus']:g} GPU each, cluster "
            f"{ray.cluster_resources().get('CPU', 0):g} CPU on {sum(n['Alive'] for n in ray.nodes())} node(s)")
        while order.ready or inflight:
            while order.ready and (workers is None or len(inflight) < workers):
                run = order.ready.popleft()
                inflight[task.remote(run.cfg, run.run_id, spec.run_reports, token, res["cpus"])] = run
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            run = inflight.pop(ref)
            try:
                files, seconds, node = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                raise (cause if isinstance(cause, OncoError) else e) from None
            run_dir = grid_dir / "runs" / run.run_id
            write_run_files(run_dir, files)
            done += 1
            say(f"[{done}/{len(runs)}] {run.run_id} {run.values} {seconds:.1f} s on {node}")
            order.finished(run)
            if on_run_end:
                on_run_end(run, run_dir)
    finally:
        for ref in inflight:  # an error or Ctrl-C: written runs stay, the rest is redone on the next call
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - best effort; the task's result is never written anyway
                pass
        if started:
            ray.shutdown()
