"""Grid YAML -> validated runs (cells × trials) -> an executor -> results tables, figure and report.

A grid file::

    name: figure3
    base_config: osteosarcoma_paper.yaml   # or base: {a config mapping}
    grid: {model.backbone: [mobilenet_v2, resnet50v2], train.lr: [0.01, 0.001]}
    trials: 5                              # trial t sets every trial key to base value + t
    trial_keys: [train.seed]               # default: head init and batch order vary, the split stays fixed
    resources: {cpus: 1, gpus: 0}          # per run, for executors that schedule (ray)

A ``recipe`` grid key varies several keys together: each item is a mapping with a ``name`` and dotted keys,
e.g. ``grid: {recipe: [{name: frozen, model.freeze: frozen}, {name: last stage, model.freeze: "last:1",
train.lr: 0.0003}]}``; tables show the recipe's name.
"""
from __future__ import annotations

import inspect
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from oncotransfer.config import (ExperimentConfig, anchor_path, anchor_paths, apply_overrides, read_yaml, to_dict,
                                 validate, with_updates)
from oncotransfer.errors import ConfigError
from oncotransfer.experiments.local_executor import run_local
from oncotransfer.experiments.ray_executor import run_ray
from oncotransfer.progress import Progress
from oncotransfer.rundir import run_finished

_GRID_KEYS = {"name", "base", "base_config", "grid", "trials", "trial_keys", "output_dir", "run_reports",
              "resources"}
_RESOURCES = {"cpus": 1.0, "gpus": 0.0}


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


@dataclass
class GridSpec:
    name: str
    base: ExperimentConfig
    grid: dict[str, list[Any]]
    trials: int = 1
    trial_keys: list[str] = field(default_factory=lambda: ["train.seed"])
    output_dir: str = "runs"
    run_reports: bool = False
    source: str = "grid"
    resources: dict[str, float] = field(default_factory=lambda: dict(_RESOURCES))


def load_grid(path: str | Path, overrides: list[str] | None = None) -> GridSpec:
    """Read and validate a grid file; ``overrides`` (``key=value``) apply to the base config."""
    path = Path(path)
    raw = read_yaml(path)
    unknown = sorted(set(raw) - _GRID_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown grid key {unknown[0]!r}; expected some of {sorted(_GRID_KEYS)}")
    if ("base" in raw) == ("base_config" in raw):
        raise ConfigError(f"{path}: give exactly one of 'base' (a config mapping) or 'base_config' (a YAML path)")
    base_dir = path.resolve().parent
    if "base_config" in raw:
        base_path = base_dir / str(raw["base_config"])
        base_raw, base_dir = read_yaml(base_path), base_path.resolve().parent
    else:
        base_raw = raw["base"]
        if not isinstance(base_raw, dict):
            raise ConfigError(f"{path}: 'base' must be a mapping of config keys")
    # Paths written in a file are relative to that file; paths given with --set / --data to the current folder.
    base_raw = anchor_paths(base_raw, base_dir)
    base = validate(anchor_paths(apply_overrides(base_raw, overrides or []), Path.cwd()), f"{path} (base)")
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ConfigError(f"{path}: 'grid' must map dotted config keys to non-empty lists, "
                          "e.g. grid: {{train.lr: [0.01, 0.001]}}")
    grid = {k: [_anchor_value(k, v, path.resolve().parent) for v in vs] for k, vs in grid.items()}
    trials = raw.get("trials", 1)
    if not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"{path}: 'trials' must be a whole number >= 1 (got {trials!r})")
    spec = GridSpec(name=str(raw.get("name") or path.stem), base=base, grid=grid, trials=trials,
                    trial_keys=list(raw.get("trial_keys") or ["train.seed"]),
                    output_dir=str(raw.get("output_dir") or "runs"), run_reports=bool(raw.get("run_reports", False)),
                    source=str(path), resources=_resources(raw.get("resources"), path))
    if not Path(spec.output_dir).is_absolute():
        spec.output_dir = str((path.resolve().parent / spec.output_dir).resolve())
    expand(spec)  # validate every cell before any training
    return spec


def _anchor_value(key: str, value: Any, base: Path) -> Any:
    """A grid value (or each key of a recipe) that is a relative path becomes relative to the grid file."""
    if key == "recipe" and isinstance(value, dict):
        return {k: anchor_path(k, v, base) for k, v in value.items()}
    return anchor_path(key, value, base)


def _resources(raw: Any, path: Path) -> dict[str, float]:
    """``resources: {cpus: 1, gpus: 0}`` -> non-negative numbers per run; unknown sub-keys fail, naming the key."""
    if raw is None:
        return dict(_RESOURCES)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: 'resources' must be a mapping, e.g. resources: {{cpus: 1, gpus: 0}}")
    out = dict(_RESOURCES)
    for key, value in raw.items():
        if key not in _RESOURCES:
            raise ConfigError(f"{path}: unknown resources key {key!r}; expected some of {sorted(_RESOURCES)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ConfigError(f"{path}: resources.{key} must be a number >= 0 (got {value!r})")
        out[key] = float(value)
    return out


def _get(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def updates_for(key: str, value: Any) -> dict[str, Any]:
    """The dotted-key updates of one grid value: a recipe sets several keys at once."""
    if key != "recipe":
        return {key: value}
    return {k: v for k, v in value.items() if k != "name"}


def _check_recipe(spec: GridSpec, value: Any) -> None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or len(value) < 2:
        raise ConfigError(f"{spec.source}: grid key 'recipe': each item must be a mapping with a 'name' and "
                          f"dotted config keys, e.g. {{name: frozen, model.freeze: frozen}} (got {value!r})")


def _check_key(spec: GridSpec, key: str, value: Any, what: str) -> ExperimentConfig:
    if key == "recipe":
        _check_recipe(spec, value)
    try:
        return with_updates(spec.base, updates_for(key, value))
    except ConfigError as e:
        raise ConfigError(f"{spec.source}: {what} {key!r} = {value!r} is not valid: "
                          f"{str(e).split(': ', 1)[-1]}") from None


def expand(spec: GridSpec) -> list[GridRun]:
    """Every cell × trial, each config validated; a bad key or value fails here, naming it."""
    keys = list(spec.grid)
    for key in keys:
        for value in spec.grid[key]:
            _check_key(spec, key, value, "grid key")
    base = to_dict(spec.base)
    for key in spec.trial_keys:
        if not isinstance(_get(base, key), int):
            raise ConfigError(f"{spec.source}: trial key {key!r} must name an integer config key, e.g. train.seed")
    from oncotransfer.models.backbones import get_backbone
    names = spec.grid.get("model.backbone", [spec.base.model.backbone])
    names += [r["model.backbone"] for r in spec.grid.get("recipe", []) if "model.backbone" in r]
    for name in names:
        try:
            get_backbone(str(name))
        except ConfigError as e:
            raise ConfigError(f"{spec.source}: grid key 'model.backbone' = {name!r}: {e}") from None
    runs = []
    for c, combo in enumerate(itertools.product(*(spec.grid[k] for k in keys))):
        values = dict(zip(keys, combo))
        for t in range(spec.trials):
            updates = {k2: v2 for k, v in values.items() for k2, v2 in updates_for(k, v).items()}
            updates.update({k: _get(base, k) + t for k in spec.trial_keys})
            cfg = with_updates(spec.base, updates)
            cfg = cfg.model_copy(update={"name": f"{spec.name}-c{c:03d}-t{t}"})
            runs.append(GridRun(f"c{c:03d}", t, values, cfg))
    return runs


def _data_key(cfg: ExperimentConfig) -> str:
    from oncotransfer.models.backbones import get_backbone
    size = cfg.data.image_size or get_backbone(cfg.model.backbone).input_size
    return json.dumps([to_dict(cfg.data), size, cfg.split.group_duplicates], sort_keys=True)


def run_one(cfg: ExperimentConfig, run_dir: Path, run_reports: bool = False,
            memo: dict[str, Any] | None = None) -> None:
    """Train and evaluate one grid run into ``run_dir``: the code every executor runs. ``memo`` maps
    ``_data_key`` to loaded data, so runs sharing a data config in one process decode the images once."""
    from oncotransfer.evaluate.report import evaluate_run
    from oncotransfer.models.backbones import get_backbone
    from oncotransfer.train.data import load_data
    from oncotransfer.experiments.run import run_experiment
    memo = {} if memo is None else memo
    key = _data_key(cfg)
    if key not in memo:
        size = cfg.data.image_size or get_backbone(cfg.model.backbone).input_size
        memo[key] = load_data(cfg.data, size, cfg.train.num_workers, phash=cfg.split.group_duplicates)
    run_experiment(cfg, run_dir, data=memo[key], report=False)
    evaluate_run(run_dir, plots=run_reports)


def pending_runs(grid_dir: Path, runs: list[GridRun]) -> list[GridRun]:
    """The runs still to do: a finished run (``rundir.run_finished``) must come from the same config."""
    todo = []
    for run in runs:
        run_dir = grid_dir / "runs" / run.run_id
        if run_finished(run_dir):
            _check_same(run, run_dir)
        else:
            todo.append(run)
    return todo


def _check_same(run: GridRun, run_dir: Path) -> None:
    """A finished run is reused only if it was made from the same config (an edited grid must not reuse it)."""
    saved = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else None
    if saved != to_dict(run.cfg):
        raise ConfigError(f"{run_dir}: a finished run with a different config; the grid changed since it ran. "
                          "Give the grid a new name or output_dir (or delete that folder) and run again")


def _counting(on_run_end: Callable[[GridRun, Path], None] | None, progress: Progress, total: int,
              done: int) -> Callable[[GridRun, Path], None]:
    """``on_run_end`` that also reports each finished run to ``progress``."""
    progress("runs", done, total)

    def counted(run: GridRun, run_dir: Path) -> None:
        nonlocal done
        done += 1
        progress("runs", done, total)
        if on_run_end:
            on_run_end(run, run_dir)
    return counted


EXECUTORS: dict[str, Callable[..., None]] = {"local": run_local, "ray": run_ray}


def grid_dir_for(spec: GridSpec) -> Path:
    return Path(spec.output_dir) / f"grid_{spec.name}"


def run_grid(spec: GridSpec, executor: str = "local", *, grid_dir: str | Path | None = None,
             workers: int | None = None, on_run_end: Callable[[GridRun, Path], None] | None = None,
             log: Callable[[str], None] | None = None, progress: Progress | None = None, **options: Any):
    """Run (or resume) every run of the grid, then write results.csv, summaries, figure, tables and report.
    ``options`` (e.g. ``address`` for ray) go to the executor; ``None`` values are dropped. ``progress`` hears
    of finished runs ("runs", done, total), counting those finished before."""
    from oncotransfer.experiments.results import write_results
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor {executor!r}: unknown executor; valid: {', '.join(sorted(EXECUTORS))}")
    options = {k: v for k, v in options.items() if v is not None}
    accepted = inspect.signature(EXECUTORS[executor]).parameters
    for key in options:
        if key not in accepted:
            raise ConfigError(f"--{key.replace('_', '-')} does not apply to the {executor} executor")
    runs = expand(spec)
    out = Path(grid_dir) if grid_dir else grid_dir_for(spec)
    out.mkdir(parents=True, exist_ok=True)
    resolved = {"name": spec.name, "base": to_dict(spec.base), "grid": spec.grid, "trials": spec.trials,
                "trial_keys": spec.trial_keys, "output_dir": spec.output_dir, "run_reports": spec.run_reports,
                "resources": spec.resources}
    (out / "grid.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    base_train = spec.base.train
    if base_train.save_every_epoch:  # per-epoch resume state costs as much as a head epoch; a run is the unit
        runs = [GridRun(r.cell, r.trial, r.values, r.cfg.model_copy(update={"train": r.cfg.train.model_copy(
            update={"save_every_epoch": False})})) for r in runs]
    if progress:
        on_run_end = _counting(on_run_end, progress, len(runs), len(runs) - len(pending_runs(out, runs)))
    EXECUTORS[executor](spec, out, runs, workers=workers, on_run_end=on_run_end, log=log, **options)
    return write_results(spec, out, runs)
