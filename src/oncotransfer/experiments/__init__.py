"""Experiment grids: cells × trials over one base config, run, summarised and reported."""
from oncotransfer.experiments.grid import EXECUTORS, GridRun, GridSpec, expand, load_grid, run_grid, run_local

__all__ = ["EXECUTORS", "GridRun", "GridSpec", "expand", "load_grid", "run_grid", "run_local"]
