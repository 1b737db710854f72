"""The order in which parallel executors start grid runs: each frozen-feature cache is filled once.

Runs of one frozen backbone on one data set share a feature-cache file. Started together, every one of them
would find the cache empty and extract the same features. So the first pending run of each such group (its
leader) is ready at once, and the rest of the group becomes ready when the leader finishes.
"""
from __future__ import annotations

import json
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from oncotransfer.config import ExperimentConfig
    from oncotransfer.experiments.grid import GridRun


def cache_group(cfg: ExperimentConfig) -> str | None:
    """Runs sharing frozen features share a cache file; None where the run does not use the cache."""
    from oncotransfer.experiments.grid import _data_key
    if cfg.model.freeze != "frozen" or not cfg.train.feature_cache:
        return None
    return json.dumps([_data_key(cfg), cfg.model.backbone, str(cfg.model.weights), str(cfg.train.cache_dir),
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
