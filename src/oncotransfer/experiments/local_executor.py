"""The local executor: grid runs on this machine, in this process or in a pool of worker processes.

A run that trains a head on cached features uses one core (a tiny head gains nothing from a second thread),
so a grid of such runs keeps every core busy only by running several at once: by default it uses one worker
process per core. Grids of fine-tuning or uncached runs default to one run at a time with all cores.

Both execute ``runs.run_one``, the code of the Ray executor too, so where a run executes does not change its
numbers; ``grid.run_grid`` drives them (``schedule.Executor``). Pool workers end with the grid, at once and
quietly, even when it is killed with SIGKILL and cannot stop them.
"""
from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import time
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Iterator

import torch

from oncotransfer.config import ExperimentConfig
from oncotransfer.errors import ConfigError
from oncotransfer.experiments.runs import GridRun, GridSpec, run_one
from oncotransfer.experiments.schedule import Executor, Finished, cache_group
from oncotransfer.runtime import usable_cores

_MEMO: dict[str, Any] = {}  # per worker process: loaded data sets, keyed by runs.data_key


def default_workers(runs: list[GridRun]) -> int:
    """One worker per core when every run trains a head on cached features; otherwise one."""
    if runs and all(cache_group(r.cfg) is not None for r in runs):
        return max(1, min(usable_cores(), len(runs)))
    return 1


def local_executor(spec: GridSpec, todo: list[GridRun], *, workers: int | None = None) -> Executor:
    """``workers`` runs at once (default: ``default_workers``): a pool of worker processes, or this process
    when one run at a time is all there is to do. The on-disk feature cache is shared, so the grid costs one
    feature pass per backbone and data set."""
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers}: give a whole number >= 1, or leave it out (one per core for "
                          "frozen runs on cached features, else 1)")
    n = workers or default_workers(todo)
    if n > 1 and len(todo) > 1:
        return PoolExecutor(n, spec.run_reports)
    return InProcessExecutor(spec.run_reports)


class InProcessExecutor:
    """One run at a time in this process; runs sharing a data config decode the images once."""
    slots = 1

    def __init__(self, run_reports: bool):
        self.run_reports = run_reports
        self._memo: dict[str, Any] = {}
        self._next: list[tuple[GridRun, Path]] = []

    def start(self, n_runs: int) -> str:
        return f"local: {n_runs} run(s) to do in this process"

    def submit(self, run: GridRun, work_dir: Path, alone: bool) -> None:
        self._next.append((run, work_dir))

    def wait(self) -> Finished:
        run, work_dir = self._next.pop(0)
        t0 = time.perf_counter()
        run_one(run.cfg, work_dir, self.run_reports, self._memo)
        return Finished(run, time.perf_counter() - t0)

    def stop(self) -> None:
        self._next.clear()


class PoolExecutor:
    """``workers`` worker processes; a run that may fill a feature cache alone gets every core."""

    def __init__(self, workers: int, run_reports: bool):
        self.slots = workers
        self.run_reports = run_reports
        self._cores = usable_cores()
        self._pool: Any = None
        self._lifeline: tuple[Connection, Connection] | None = None  # workers end when its write end closes
        self._ended: queue.Queue = queue.Queue()

    def start(self, n_runs: int) -> str:
        # forkserver, not fork: forking a process whose torch thread pools run can hang the child. The server
        # imports the training code once and lives as long as this process, so later pools start at once.
        ctx = multiprocessing.get_context("forkserver")
        # The fork server ignores Ctrl-C only once its preload is imported (seconds: torch), and Ctrl-C reaches
        # the whole process group: a first module that ignores it spares the server a KeyboardInterrupt traceback
        # mid-import (and the grid a FileNotFoundError from the dead server). The grid stops the server.
        ctx.set_forkserver_preload(["oncotransfer.forkserver_sigint",
                                    "oncotransfer.experiments.local_executor"])
        with _interrupt_deferred():
            self._lifeline = ctx.Pipe(duplex=False)  # (read end: every worker's copy, write end: this process)
            self._pool = ctx.Pool(self.slots, initializer=_end_with_parent, initargs=(self._lifeline[0],))
        return f"local: {n_runs} run(s) to do in {self.slots} worker processes"

    def submit(self, run: GridRun, work_dir: Path, alone: bool) -> None:
        threads = self._cores if alone else max(1, self._cores // self.slots)
        self._pool.apply_async(_work, (run.cfg, str(work_dir), self.run_reports, threads, os.getcwd(),
                                       dict(os.environ)),
                               callback=lambda s, r=run: self._ended.put((r, s, None)),
                               error_callback=lambda e, r=run: self._ended.put((r, 0.0, e)))

    def wait(self) -> Finished:
        run, seconds, error = self._ended.get()
        if error is not None:
            raise error
        return Finished(run, seconds)

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
        if self._lifeline is not None:
            for end in self._lifeline:
                end.close()
            self._lifeline = None



@contextmanager
def _interrupt_deferred() -> Iterator[None]:
    """Ctrl-C while the pool starts takes effect once it has started (the fork server's imports: seconds).
    Acted on at once, the grid exited while the server was still forking workers, and each new worker died on
    a FileNotFoundError traceback unpickling the pool's semaphores, which the exiting grid had removed. SIGINT
    is also blocked meanwhile, so the fork server starts with it blocked until it ignores it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from multiprocessing import resource_tracker
    resource_tracker.ensure_running()  # its start unblocks SIGINT when done: before the block, not inside it
    seen: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # one that came while blocked is recorded now
        signal.signal(signal.SIGINT, previous)
    if seen:
        raise KeyboardInterrupt


def _end_with_parent(lifeline: Connection) -> None:
    """Pool worker set-up: the worker ends the moment the grid process does, even one killed with SIGKILL that
    cannot stop its pool, instead of finishing a run nobody waits for and dying on a BrokenPipeError traceback.

    ``lifeline`` is the read end of a pipe whose only write end the grid holds: it reads end-of-file when the
    grid is gone. (The worker's parent is the fork server, not the grid, and the fork server outlives the grid
    while any worker lives, so a parent-death signal would never come.)"""
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # writing to a dead grid's pipe ends the worker silently
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the grid stops the pool
    threading.Thread(target=_watch, args=(lifeline,), daemon=True, name="grid-lifeline").start()


def _watch(lifeline: Connection) -> None:
    try:
        lifeline.recv_bytes()  # the grid never writes: this returns only by end-of-file
    except (EOFError, OSError):
        pass
    os._exit(0)


def _work(cfg: ExperimentConfig, work_dir: str, run_reports: bool, threads: int, cwd: str,
          env: dict[str, str]) -> float:
    """One run in a worker process, in the parent's working folder and environment; returns its seconds."""
    os.chdir(cwd)  # the fork server started earlier and may sit elsewhere, with older variables
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    run_one(cfg, Path(work_dir), run_reports, _MEMO)
    return time.perf_counter() - t0
