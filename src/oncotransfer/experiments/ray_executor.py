"""The Ray executor: each pending grid run is one Ray task with the grid's ``resources`` (CPUs, GPUs per run).

A task trains into a temporary folder on its node and returns the run directory as ``{relative path: bytes}``;
the driver writes it into the run's work folder, which ``grid.run_grid`` then renames into place, so nodes need
no shared filesystem and an interrupted grid never holds a half-written run: rerunning it resumes like the
local executor. Tasks run ``runs.run_one``, the very code of the local executor. ``grid.run_grid``'s schedule
starts the first pending run of each frozen backbone alone before the rest fan out, so the feature cache of the
node it ran on is filled once rather than by every task at the same time.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from oncotransfer.config import ExperimentConfig
from oncotransfer.errors import ConfigError, MissingExtraError, OncoError
from oncotransfer.experiments.runs import GridRun, GridSpec, run_one
from oncotransfer.experiments.schedule import Executor, Finished

_MEMO: dict[str, Any] = {"token": None, "data": {}}  # per worker process: loaded data of the current grid


def _import_ray():
    try:
        import ray  # an optional extra: imported only by a grid that asks for it
    except ImportError:
        raise MissingExtraError("--executor ray needs Ray: pip install 'oncotransfer[ray]'") from None
    return ray


def _task(cfg: ExperimentConfig, run_id: str, run_reports: bool, token: str,
          cpus: float) -> tuple[dict[str, bytes], float, str]:
    """Run one grid run in a temporary folder; return its files, seconds and the node (address/id)."""
    import ray  # in a Ray worker, where Ray is installed

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
    return files, seconds, f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:6]}"


def write_run_files(run_dir: Path, files: dict[str, bytes]) -> None:
    """Write a task's run directory (``{relative path: bytes}``) into ``run_dir``, refusing paths outside it."""
    for rel in files:
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise ValueError(f"run file {rel!r} escapes the run directory")
    for rel, data in files.items():
        path = run_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _check_fits(ray, resources: dict[str, float]) -> None:
    """A task no node can hold would wait forever: fail up front instead."""
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if not any(r.get("CPU", 0) >= resources["cpus"] and r.get("GPU", 0) >= resources["gpus"] for r in nodes):
        have = ", ".join(f"{r.get('CPU', 0):g} CPU/{r.get('GPU', 0):g} GPU" for r in nodes) or "no nodes"
        raise ConfigError(f"resources: {resources['cpus']:g} CPU and {resources['gpus']:g} GPU per run fit no node "
                          f"of the Ray cluster ({have}); lower the grid's resources or add a bigger node")


def ray_executor(spec: GridSpec, todo: list[GridRun], *, workers: int | None = None,
                 address: str | None = None) -> Executor:
    """Runs as Ray tasks on the cluster at ``address`` (None: RAY_ADDRESS, a cluster started on this machine,
    else a new local instance; "auto" allowed). ``workers`` caps the runs in flight (default: as many as the
    cluster's resources hold)."""
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers}: give a whole number >= 1, or leave it out (no cap)")
    return RayExecutor(spec, workers, address)


class RayExecutor:
    def __init__(self, spec: GridSpec, workers: int | None, address: str | None):
        self.slots = workers
        self.run_reports = spec.run_reports
        self.resources = spec.resources
        self.address = address
        self._ray: Any = None
        self._started = False  # this executor started Ray (so it shuts it down)
        self._task: Any = None
        self._token = os.urandom(8).hex()
        self._inflight: dict[Any, tuple[GridRun, Path]] = {}

    def start(self, n_runs: int) -> str:
        ray = self._ray = _import_ray()
        if not ray.is_initialized():
            kw: dict[str, Any] = {"include_dashboard": False} if self.address is None else {}
            try:
                ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING, **kw)
            except ConnectionError as e:
                raise ConfigError(f"--address {self.address}: cannot connect to a Ray cluster ({e})") from None
            self._started = True
        res = self.resources
        self._task = ray.remote(_task).options(num_cpus=res["cpus"], num_gpus=res["gpus"])
        _check_fits(ray, res)
        return (f"ray: {n_runs} run(s) to do, {res['cpus']:g} CPU / {res['gpus']:g} GPU each, cluster "
                f"{ray.cluster_resources().get('CPU', 0):g} CPU on {sum(n['Alive'] for n in ray.nodes())} node(s)")

    def submit(self, run: GridRun, work_dir: Path, alone: bool) -> None:
        ref = self._task.remote(run.cfg, run.run_id, self.run_reports, self._token, self.resources["cpus"])
        self._inflight[ref] = (run, work_dir)

    def wait(self) -> Finished:
        ray = self._ray
        [ref], _ = ray.wait(list(self._inflight), num_returns=1)
        run, work_dir = self._inflight.pop(ref)
        try:
            files, seconds, node = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            raise (cause if isinstance(cause, OncoError) else e) from None
        write_run_files(work_dir, files)
        return Finished(run, seconds, node)

    def stop(self) -> None:
        for ref in self._inflight:  # an error or Ctrl-C: written runs stay, the rest is redone on the next call
            try:
                self._ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - best effort; the task's result is never written anyway
                pass
        self._inflight.clear()
        if self._started:
            self._ray.shutdown()
            self._started = False
