"""How a grid's runs are scheduled: the contract every executor implements, and the order runs start in.

``grid.run_grid`` owns the one scheduling loop (pending runs, order, resume, ``on_run_end``, logging). An
``Executor`` only executes: it starts runs it is handed, says when each one has ended, and stops.

Runs of one frozen backbone on one data set share a feature-cache file. Started together, every one of them
would find the cache empty and extract the same features. So the first pending run of each such group (its
leader) is ready at once, and the rest of the group becomes ready when the leader finishes (``LeadersFirst``).
"""
from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import NamedTuple, Protocol

from oncotransfer.config import ExperimentConfig
from oncotransfer.experiments.runs import GridRun, data_key


class Finished(NamedTuple):
    """A run that ended well: its whole run directory is in the ``work_dir`` it was submitted with."""
    run: GridRun
    seconds: float
    node: str | None = None  # where it ran, for executors with several machines


class Executor(Protocol):
    """Where grid runs execute (this process, a pool of worker processes, a Ray cluster)."""

    slots: int | None
    """Runs in flight at most (None: as many as the executor accepts; it queues the rest itself)."""

    def start(self, n_runs: int) -> str:
        """Get ready for ``n_runs`` runs (start processes, connect); return one line saying where they go."""
        ...

    def submit(self, run: GridRun, work_dir: Path, alone: bool) -> None:
        """Start ``run``, its run directory to be written to ``work_dir``. ``alone``: nothing else runs now and
        the run may fill a feature cache others wait for, so it may take every core."""
        ...

    def wait(self) -> Finished:
        """Block until a submitted run ends; raise its error if it failed."""
        ...

    def stop(self) -> None:
        """Stop at once (also after an error or Ctrl-C, and before ``start``): runs in flight are abandoned."""
        ...


def cache_group(cfg: ExperimentConfig) -> str | None:
    """Runs sharing frozen features share a cache file; None where the run does not use the cache."""
    if cfg.model.freeze != "frozen" or not cfg.train.feature_cache:
        return None
    return json.dumps([data_key(cfg), cfg.model.backbone, str(cfg.model.weights), str(cfg.train.cache_dir),
                       cfg.train.feature_engine])


class LeadersFirst:
    """``ready`` holds the runs that may start now; call ``finished(run)`` as each run ends."""

    def __init__(self, pending: list[GridRun]):
        self.ready: deque[GridRun] = deque()
        self._held: dict[str, list[GridRun]] = {}
        for run in pending:
            group = cache_group(run.cfg)
            if group is None or group not in self._held:
                self.ready.append(run)
                if group is not None:
                    self._held[group] = []
            else:
                self._held[group].append(run)
        self._leaders = {id(r) for r in self.ready}

    def is_leader(self, run: GridRun) -> bool:
        """True for a run that fills a feature cache (or uses none): the rest of its group waits for it."""
        return id(run) in self._leaders

    def finished(self, run: GridRun) -> None:
        if self.is_leader(run):
            self.ready.extend(self._held.pop(cache_group(run.cfg) or "", []))
