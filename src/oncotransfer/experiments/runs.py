"""A grid and one of its runs: what they are (``GridSpec``, ``GridRun``), the code every executor runs for it (``run_one``), which runs of a
grid are still to do (``pending_runs``), and the key of the data it loads (``data_key``).

A leaf inside ``experiments``: the grid, its executors and its scheduler import it, it imports none of them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oncotransfer.yaml_io import read_run_yaml

from oncotransfer.config import ExperimentConfig, to_dict
from oncotransfer.errors import ConfigError
from oncotransfer.evaluate.report import evaluate_run
from oncotransfer.experiments.run import run_experiment
from oncotransfer.models.backbones import get_backbone
from oncotransfer.rundir import run_finished
from oncotransfer.train.data import load_data


@dataclass(frozen=True)
class GridSpec:
    """A validated grid file (``grid.load_grid``): a base config, the values to vary, trials and where to write."""
    name: str
    base: ExperimentConfig
    grid: dict[str, list[Any]]
    trials: int
    trial_keys: list[str]
    output_dir: str
    run_reports: bool
    source: str
    resources: dict[str, float]


@dataclass(frozen=True)
class GridRun:
    """One run of the grid: a cell (one combination of grid values) and a trial number."""
    cell: str
    trial: int
    values: dict[str, Any]
    cfg: ExperimentConfig

    @property
    def run_id(self) -> str:
        return f"{self.cell}_t{self.trial}"


def data_key(cfg: ExperimentConfig) -> str:
    """Runs with equal keys load the same images at the same size: one decode serves them all."""
    size = cfg.data.image_size or get_backbone(cfg.model.backbone).input_size
    return json.dumps([to_dict(cfg.data), size, cfg.split.group_duplicates], sort_keys=True)


def run_one(cfg: ExperimentConfig, run_dir: Path, run_reports: bool = False,
            memo: dict[str, Any] | None = None) -> None:
    """Train and evaluate one grid run into ``run_dir``: the code every executor runs. ``memo`` maps
    ``data_key`` to loaded data, so runs sharing a data config in one process decode the images once."""
    memo = {} if memo is None else memo
    key = data_key(cfg)
    if key not in memo:
        size = cfg.data.image_size or get_backbone(cfg.model.backbone).input_size
        memo[key] = load_data(cfg.data, size, cfg.train.num_workers, phash=cfg.split.group_duplicates)
    run_experiment(cfg, run_dir, data=memo[key], report=False)
    evaluate_run(run_dir, plots=run_reports)


def pending_runs(grid_dir: Path, runs: list[GridRun], expect_report: bool = False) -> list[GridRun]:
    """The runs still to do: a finished run (``rundir.run_finished``; with ``expect_report`` its report too)
    must come from the same config."""
    todo = []
    for run in runs:
        run_dir = grid_dir / "runs" / run.run_id
        if run_finished(run_dir, expect_report):
            _check_same(run, run_dir)
        else:
            todo.append(run)
    return todo


def _check_same(run: GridRun, run_dir: Path) -> None:
    """A finished run is reused only if it was made from the same config (an edited grid must not reuse it)."""
    saved = read_run_yaml(run_dir / "config.yaml")[0] if (run_dir / "config.yaml").is_file() else None
    if saved != to_dict(run.cfg):
        raise ConfigError(f"{run_dir}: a finished run with a different config; the grid changed since it ran. "
                          "Give the grid a new name or output_dir (or delete that folder) and run again")
