"""The local executor: grid runs on this machine, in this process or in a pool of worker processes.

A run that trains a head on cached features uses one core (a tiny head gains nothing from a second thread),
so a grid of such runs keeps every core busy only by running several at once: by default it uses one worker
process per core. Grids of fine-tuning or uncached runs default to one run at a time with all cores.

Workers train into ``runs/.partial/RUN_ID`` and the parent moves a finished run into ``runs/RUN_ID``, so an
interrupted grid holds only whole runs, each reported to ``on_run_end``; rerunning it does the rest. Every run
executes ``grid.run_one``, the code of the Ray executor too, so where a run executes does not change its
numbers.
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from oncotransfer.errors import ConfigError
from oncotransfer.experiments.schedule import LeadersFirst, cache_group

if TYPE_CHECKING:
    from oncotransfer.config import ExperimentConfig
    from oncotransfer.experiments.grid import GridRun, GridSpec

_MEMO: dict[str, Any] = {}  # per worker process: loaded data sets, keyed by grid._data_key


def default_workers(runs: list[GridRun]) -> int:
    """One worker per core when every run trains a head on cached features; otherwise one."""
    from oncotransfer.runtime import usable_cores
    if runs and all(cache_group(r.cfg) is not None for r in runs):
        return max(1, min(usable_cores(), len(runs)))
    return 1


def run_local(spec: GridSpec, grid_dir: Path, runs: list[GridRun], *, workers: int | None = None,
              on_run_end: Callable[[GridRun, Path], None] | None = None,
              log: Callable[[str], None] | None = None) -> None:
    """Run the pending runs, ``workers`` at a time (default: ``default_workers``); finished runs are skipped.
    The on-disk feature cache is shared, so the grid costs one feature pass per backbone and data set."""
    from oncotransfer.experiments.grid import pending_runs, run_one
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers}: give a whole number >= 1, or leave it out (one per core for "
                          "frozen runs on cached features, else 1)")
    say = log or (lambda s: None)
    todo = pending_runs(grid_dir, runs)
    n = workers or default_workers(todo)
    if n > 1 and len(todo) > 1:
        return _run_pool(spec, grid_dir, runs, todo, n, on_run_end, say)
    loaded: dict[str, Any] = {}  # one process: runs sharing a data config decode the images once
    for done, run in enumerate(todo, start=len(runs) - len(todo) + 1):
        run_dir = grid_dir / "runs" / run.run_id
        t0 = time.perf_counter()
        run_one(run.cfg, run_dir, spec.run_reports, loaded)
        say(f"[{done}/{len(runs)}] {run.run_id} {run.values} {time.perf_counter() - t0:.1f} s")
        if on_run_end:
            on_run_end(run, run_dir)


def _work(cfg: ExperimentConfig, work_dir: str, run_reports: bool, threads: int, cwd: str,
          env: dict[str, str]) -> float:
    """One run in a worker process, in the parent's working folder and environment; returns its seconds."""
    import torch

    from oncotransfer.experiments.grid import run_one
    os.chdir(cwd)  # the fork server started earlier and may sit elsewhere, with older variables
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    run_one(cfg, Path(work_dir), run_reports, _MEMO)
    return time.perf_counter() - t0


def _run_pool(spec: GridSpec, grid_dir: Path, runs: list[GridRun], todo: list[GridRun], workers: int,
              on_run_end: Callable[[GridRun, Path], None] | None, say: Callable[[str], None]) -> None:
    from oncotransfer.runtime import usable_cores
    cores = usable_cores()
    partial = grid_dir / "runs" / ".partial"
    shutil.rmtree(partial, ignore_errors=True)  # left by a grid that was killed
    order = LeadersFirst(todo)
    finished: queue.Queue = queue.Queue()
    inflight: dict[str, GridRun] = {}
    done = len(runs) - len(todo)
    say(f"local: {len(todo)} run(s) to do in {workers} worker processes")
    # forkserver, not fork: forking a process whose torch thread pools run can hang the child. The server
    # imports the training code once and lives as long as this process, so later pools start at once.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["oncotransfer.experiments.grid", "oncotransfer.experiments.run"])
    pool = ctx.Pool(workers)
    try:
        while order.ready or inflight:
            while order.ready and len(inflight) < workers:
                run = order.ready.popleft()
                # a leader fills a feature cache while its group waits: give it the cores the waiting would idle
                threads = cores if order.is_leader(run) and len(inflight) == 0 else max(1, cores // workers)
                inflight[run.run_id] = run
                pool.apply_async(_work, (run.cfg, str(partial / run.run_id), spec.run_reports, threads,
                                         os.getcwd(), dict(os.environ)),
                                 callback=lambda s, r=run: finished.put((r, s, None)),
                                 error_callback=lambda e, r=run: finished.put((r, 0.0, e)))
            run, seconds, error = finished.get()
            del inflight[run.run_id]
            if error is not None:
                raise error
            run_dir = grid_dir / "runs" / run.run_id
            if run_dir.exists():  # a half-made run left by an interrupted one-process grid
                shutil.rmtree(run_dir)
            os.replace(partial / run.run_id, run_dir)
            done += 1
            say(f"[{done}/{len(runs)}] {run.run_id} {run.values} {seconds:.1f} s")
            order.finished(run)
            if on_run_end:
                on_run_end(run, run_dir)
    finally:  # an error or Ctrl-C: moved runs stay, the unfinished ones are redone on the next call
        pool.terminate()
        pool.join()
        shutil.rmtree(partial, ignore_errors=True)
