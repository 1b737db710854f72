"""Experiment grids: cells × trials over one base config, run, summarised and reported."""
from oncotransfer.experiments.grid import EXECUTORS, GridConfig, expand, load_grid, run_grid
from oncotransfer.experiments.runs import GridRun, GridSpec
from oncotransfer.experiments.schedule import Executor

__all__ = ["EXECUTORS", "Executor", "GridConfig", "GridRun", "GridSpec", "expand", "load_grid", "run_grid"]
