"""Grid YAML -> validated runs (cells × trials) -> an executor -> results tables, figure and report.

A grid file::

    name: figure3
    base_config: osteosarcoma_paper.yaml   # or base: {a config mapping}
    grid: {model.backbone: [mobilenet_v2, resnet50v2], train.lr: [0.01, 0.001]}
    trials: 5                              # trial t sets every trial key to base value + t
    trial_keys: [train.seed]               # default: head init and batch order vary, the split stays fixed
    resources: {cpus: 1, gpus: 0}          # per run, for executors that schedule (ray)
    output_dir: runs                       # relative to the grid file; the grid writes output_dir/grid_NAME
    run_reports: false                     # true: plots and report.html per run (about 0.7 s a run)

A ``recipe`` grid key varies several keys together: each item is a mapping with a ``name`` and dotted keys,
e.g. ``grid: {recipe: [{name: frozen, model.freeze: frozen}, {name: last stage, model.freeze: "last:1",
train.lr: 0.0003}]}``; tables show the recipe's name.
"""
from __future__ import annotations

import inspect
import itertools
import math
import os
import shutil
from pathlib import Path
from typing import Annotated, Any, Callable

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from oncotransfer.config import (MAX_NAME_CHARS, ExperimentConfig, anchor_path, anchor_paths, apply_overrides,
                                 read_yaml, to_dict, validate, validate_as, with_updates)
from oncotransfer.errors import ConfigError
from oncotransfer.experiments.local_executor import local_executor
from oncotransfer.experiments.ray_executor import ray_executor
from oncotransfer.experiments.results import write_results
from oncotransfer.experiments.runs import GridRun, GridSpec, pending_runs
from oncotransfer.experiments.schedule import Executor, LeadersFirst
from oncotransfer.limits import MAX_GRID_RUNS
from oncotransfer.models.backbones import get_backbone
from oncotransfer.progress import Progress


class Resources(BaseModel):
    """Per run, for executors that schedule (ray): ``resources: {cpus: 1, gpus: 0}``."""
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    cpus: float = Field(default=1.0, ge=0, strict=True)  # strict: a number, not "1" or true
    gpus: float = Field(default=0.0, ge=0, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _mapping(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            raise ValueError("must be a mapping, e.g. resources: {cpus: 1, gpus: 0}")
        unknown = sorted(set(raw) - set(cls.model_fields))
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r}; expected some of {', '.join(cls.model_fields)}")
        return raw


class GridConfig(BaseModel):
    """The grid file (see the module docstring). A key left empty (``trials:``) takes its default."""
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    name: str | None = Field(default=None, min_length=1)
    """Default: the file's name without .yaml. The grid writes to ``output_dir/grid_NAME``."""
    base: dict[str, Any] | None = None
    base_config: str | None = None
    """A run config file, relative to the grid file; give it or ``base``, not both."""
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(default_factory=dict)
    trials: int = Field(default=1, ge=1, strict=True)
    trial_keys: list[str] = Field(default_factory=lambda: ["train.seed"])
    output_dir: str = Field(default="runs", min_length=1)
    run_reports: bool = False
    resources: Resources = Field(default_factory=Resources)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_default(cls, raw: Any) -> Any:
        return {k: v for k, v in raw.items() if v is not None} if isinstance(raw, dict) else raw

    @field_validator("name")
    @classmethod
    def _folder_name(cls, name: str | None) -> str | None:
        if name is not None and ("/" in name or "\\" in name or name in (".", "..")):
            raise ValueError("a grid name is one folder name (no '/' or '..'); choose where it goes with output_dir")
        if name is not None and (len(name.encode()) > MAX_NAME_CHARS or any(ord(c) < 32 for c in name)):
            raise ValueError(f"a grid name is one folder name of at most {MAX_NAME_CHARS} bytes, without control "
                             "characters")
        return name

    @model_validator(mode="after")
    def _consistent(self) -> GridConfig:
        if (self.base is None) == (self.base_config is None):
            raise ValueError("give exactly one of 'base' (a config mapping) or 'base_config' (a YAML path)")
        runs = math.prod(len(v) for v in self.grid.values()) * self.trials
        if runs > MAX_GRID_RUNS:  # checked before the cells are expanded, each of which is validated
            sizes = " x ".join(str(len(v)) for v in self.grid.values()) or "1"
            raise ValueError(f"the grid has {sizes} cells x {self.trials} trial(s) = {runs:,} runs, above the "
                             f"limit of {MAX_GRID_RUNS:,}; split it into several grid files")
        if not self.trial_keys and self.trials > 1:
            raise ValueError(f"trial_keys is empty, so the {self.trials} trials of a cell would be the same run; "
                             "name the keys that trials vary, e.g. trial_keys: [train.seed]")
        return self


def load_grid(path: str | Path, overrides: list[str] | None = None) -> GridSpec:
    """Read and validate a grid file; ``overrides`` (``key=value``) apply to the base config."""
    path = Path(path)
    raw = validate_as(GridConfig, read_yaml(path), str(path))
    here = path.resolve().parent
    if raw.base_config is not None:
        base_path = here / raw.base_config
        base_raw, base_dir = read_yaml(base_path), base_path.resolve().parent
    else:
        base_raw, base_dir = raw.base, here
    # Paths written in a file are relative to that file; paths given with --set / --data to the current folder.
    base_raw = anchor_paths(base_raw, base_dir)
    base = validate(anchor_paths(apply_overrides(base_raw, overrides or []), Path.cwd()), f"{path} (base)")
    grid = {k: [_anchor_value(k, v, here) for v in vs] for k, vs in raw.grid.items()}
    output_dir = Path(raw.output_dir)
    spec = GridSpec(name=raw.name or path.stem, base=base, grid=grid, trials=raw.trials,
                    trial_keys=list(raw.trial_keys), run_reports=raw.run_reports, source=str(path),
                    output_dir=str(output_dir if output_dir.is_absolute() else (here / output_dir).resolve()),
                    resources=raw.resources.model_dump())
    expand(spec)  # validate every cell before any training
    return spec


def _anchor_value(key: str, value: Any, base: Path) -> Any:
    """A grid value (or each key of a recipe) that is a relative path becomes relative to the grid file."""
    if key == "recipe" and isinstance(value, dict):
        return {k: anchor_path(k, v, base) for k, v in value.items()}
    return anchor_path(key, value, base)


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


EXECUTORS: dict[str, Callable[..., Executor]] = {"local": local_executor, "ray": ray_executor}
"""Executor factories ``(spec, pending runs, *, workers=None, **options) -> schedule.Executor``; they check
their options and start nothing."""


def grid_dir_for(spec: GridSpec) -> Path:
    return Path(spec.output_dir) / f"grid_{spec.name}"


def run_grid(spec: GridSpec, executor: str = "local", *, grid_dir: str | Path | None = None,
             workers: int | None = None, on_run_end: Callable[[GridRun, Path], None] | None = None,
             log: Callable[[str], None] | None = None, progress: Progress | None = None, **options: Any):
    """Run (or resume) every run of the grid, then write results.csv, summaries, figure, tables and report.
    ``options`` (e.g. ``address`` for ray) go to the executor; ``None`` values are dropped. ``progress`` hears
    of finished runs ("runs", done, total), counting those finished before."""
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor {executor!r}: unknown executor; valid: {', '.join(sorted(EXECUTORS))}")
    options = {k: v for k, v in options.items() if v is not None}
    accepted = inspect.signature(EXECUTORS[executor]).parameters
    for key in options:
        if key not in accepted:
            raise ConfigError(f"--{key.replace('_', '-')} does not apply to the {executor} executor")
    runs = expand(spec)
    if executor == "local":  # a Ray worker may have the GPU the head lacks; a local run has only this machine's
        from oncotransfer.train.device import pick_device
        for device in sorted({r.cfg.train.device for r in runs}):
            pick_device(device)  # its one-line error before the grid folder is made
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
    todo = pending_runs(out, runs, expect_report=spec.run_reports)
    if progress:
        on_run_end = _counting(on_run_end, progress, len(runs), len(runs) - len(todo))
    runner = EXECUTORS[executor](spec, todo, workers=workers, **options)
    if todo:
        _execute(runner, out, len(runs), todo, on_run_end, log or (lambda s: None))
    return write_results(spec, out, runs)


def _execute(runner: Executor, grid_dir: Path, n_runs: int, todo: list[GridRun],
             on_run_end: Callable[[GridRun, Path], None] | None, say: Callable[[str], None]) -> None:
    """The one scheduling loop of every executor. Runs are written into ``runs/.partial/RUN_ID`` and renamed
    into ``runs/RUN_ID`` when whole, so an interrupted grid holds only whole runs, each reported to
    ``on_run_end``; rerunning it does the rest."""
    partial = grid_dir / "runs" / ".partial"
    shutil.rmtree(partial, ignore_errors=True)  # left by a grid that was killed
    partial.mkdir(parents=True)
    order = LeadersFirst(todo)
    inflight, done = 0, n_runs - len(todo)
    try:
        say(runner.start(len(todo)))
        while order.ready or inflight:
            while order.ready and (runner.slots is None or inflight < runner.slots):
                run = order.ready.popleft()
                # a leader fills a feature cache while its group waits: it may use the cores the waiting idles
                runner.submit(run, partial / run.run_id, alone=order.is_leader(run) and inflight == 0)
                inflight += 1
            run, seconds, node = runner.wait()
            inflight -= 1
            run_dir = grid_dir / "runs" / run.run_id
            if run_dir.exists():  # an unfinished run left by an older version, or one whose report is missing
                shutil.rmtree(run_dir)
            os.replace(partial / run.run_id, run_dir)
            done += 1
            say(f"[{done}/{n_runs}] {run.run_id} {run.values} {seconds:.1f} s" + (f" on {node}" if node else ""))
            order.finished(run)
            if on_run_end:
                on_run_end(run, run_dir)
    finally:  # an error or Ctrl-C: moved runs stay, the unfinished ones are redone on the next call
        runner.stop()
        shutil.rmtree(partial, ignore_errors=True)
