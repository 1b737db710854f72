"""``oncotransfer tune``: an Optuna search over recipes, evaluated honestly by nested cross-validation.

Outer grouped folds (the split's own grouping: patients or near-duplicate images) each hold out a test part; a
whole search (TPE, pruned after each inner fold) runs on the rest, its best recipe is refitted there and scored on
the held-out part. The pooled held-out predictions give the nested estimate. One more search on all data chooses
the final recipe (its best inner score is the naive figure), which is trained as a normal run directory."""
from __future__ import annotations

import json
import math
import resource
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from oncotransfer.config import ExperimentConfig, to_dict
from oncotransfer.data.augment import Augmenter
from oncotransfer.data.splits import Fold, make_split
from oncotransfer.errors import ConfigError, MissingExtraError, OncoError
from oncotransfer.evaluate.metrics import classification_metrics
from oncotransfer.experiments.run import RunResult, run_experiment
from oncotransfer.experiments.tune_space import recipe_config, recipe_yaml, sample
from oncotransfer.io import atomic_write_text
from oncotransfer.rundir import run_finished
from oncotransfer.search_config import SearchConfig
from oncotransfer.train.data import LoadedData, load_data
from oncotransfer.train.device import pick_device
from oncotransfer.train.fold import collect_outputs, train_fold


@dataclass
class TuneResult:
    tune_dir: Path
    nested: dict
    """Pooled held-out metrics of the outer folds: accuracy, accuracy_ci95, ..., and the per-fold figures."""
    naive: float
    """The final search's best trial scored on its own inner folds (what a search without nesting reports)."""
    recipe: dict
    run: RunResult
    summary: dict = field(default_factory=dict)


class _Data:
    """Images decoded once per image size, every size in the same manifest order as the first."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg, self.by_size = cfg, {}

    def __call__(self, cfg: ExperimentConfig) -> LoadedData:
        size = cfg.data.image_size or 224
        if size not in self.by_size:
            data = load_data(cfg.data, size, cfg.train.num_workers, phash=cfg.split.group_duplicates)
            first = next(iter(self.by_size.values()), None)
            if first is not None and first.manifest.paths != data.manifest.paths:
                raise ConfigError(f"data at image size {size} decodes other files than at the first size; "
                                  "remove the unreadable images or search one image size")
            self.by_size[size] = data
        return self.by_size[size]


def _kfold(cfg: ExperimentConfig, folds: int):
    return cfg.split.model_copy(update={"kind": "kfold", "folds": folds})


def _inner_folds(cfg: ExperimentConfig, data: LoadedData, rows: np.ndarray, k: int) -> list[Fold]:
    """Grouped k-fold over ``rows`` (the outer training part), as global row indices."""
    m = data.manifest
    split = make_split(m.subset(rows), _kfold(cfg, k), data.dup_groups[rows])
    return [Fold(f.index, rows[f.train], rows[f.val], rows[f.test]) for f in split.folds]


def _fit_and_score(cfg: ExperimentConfig, data: LoadedData, fold: Fold, work: Path, device) -> np.ndarray:
    """Train ``fold`` with ``cfg`` (in a scratch folder: its fit state is not kept) -> test-row probabilities."""
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        res = train_fold(cfg, data, fold, Path(tmp), device, Augmenter(cfg.augment))
        out = collect_outputs(res, data, cfg, device)
    return out.predictions[[f"prob_{c}" for c in data.manifest.classes]].to_numpy(dtype=np.float64)


def _score(metric: str, y: np.ndarray, probs: np.ndarray, classes: list[str]) -> float:
    value = classification_metrics(y, probs, classes, bootstrap=0)[metric]
    return float(value) if value is not None and not math.isnan(value) else 0.0


def _objective(base: ExperimentConfig, search: SearchConfig, data_for: _Data, folds: list[Fold], work: Path,
               device, optuna) -> Callable:
    def objective(trial) -> float:
        cfg = recipe_config(base, sample(trial, search.space))
        data = data_for(cfg)
        scores = []
        for j, fold in enumerate(folds):
            probs = _fit_and_score(cfg, data, fold, work, device)
            scores.append(_score(search.metric, data.manifest.labels[fold.test], probs, data.manifest.classes))
            trial.report(float(np.mean(scores)), j)  # the pruner compares trials after the same inner folds
            if j < len(folds) - 1 and trial.should_prune():
                raise optuna.TrialPruned()
        return float(np.mean(scores))
    return objective


def _pruner(name: str, n_folds: int, optuna):
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=n_folds, reduction_factor=3)
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)


def _search(name: str, objective: Callable, search: SearchConfig, storage: str, trials: int, timeout: float | None,
            n_folds: int, say: Callable[[str], None]):
    """Run (or continue) one study to ``trials`` finished trials: those already COMPLETE or PRUNED are not rerun."""
    optuna = _optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True, direction="maximize",
                                sampler=optuna.samplers.TPESampler(seed=search.seed),
                                pruner=_pruner(search.pruner, n_folds, optuna))
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=states))
    if done < trials and (timeout is None or timeout > 0):
        # The callback counts trials of every process sharing the study, so several workers stop together.
        study.optimize(objective, n_trials=trials - done, timeout=timeout, catch=(OncoError,),
                       callbacks=[optuna.study.MaxTrialsCallback(trials, states=states)])
    finished = study.get_trials(deepcopy=False, states=states)
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in finished):
        raise ConfigError(f"tune: search {name} finished no trial in its budget; give a larger --budget or a "
                          "smaller search space (fewer epochs, one backbone)")
    say(f"{name}: {len(finished)} trial(s) ({sum(t.state == states[1] for t in finished)} pruned), "
        f"best inner {search.metric} {study.best_value:.3f}")
    return study


def _optuna():
    try:  # the `tune` extra: imported on use, so the rest of the package works without it
        import optuna
    except ImportError:
        raise MissingExtraError("oncotransfer tune needs Optuna; pip install 'oncotransfer[tune]'") from None
    return optuna


def _cpu_minutes() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime) / 60


def tune_dir_for(cfg: ExperimentConfig) -> Path:
    """One folder per config name, so running the same command again continues the tune."""
    return Path(cfg.output_dir) / f"{cfg.name}-tune"


def _check_same(tune_dir: Path, cfg: ExperimentConfig, search: SearchConfig) -> None:
    """A tune folder continues only the tune it was started with (trials and budget may change)."""
    record = {"config": to_dict(cfg), "search": search.model_dump(mode="json", exclude={"trials", "budget"})}
    saved = tune_dir / "tune_config.json"
    if saved.is_file():
        if json.loads(saved.read_text()) != json.loads(json.dumps(record)):
            raise ConfigError(f"{tune_dir} holds a tune of another config or search; give another name "
                              "(--set name=...) or remove that folder")
        return
    tune_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, json.dumps(record, indent=1))


def run_tune(cfg: ExperimentConfig, search: SearchConfig, *, trials: int | None = None,
             budget_s: float | None = None, storage: str | None = None, tune_dir: Path | None = None,
             log: Callable[[str], None] = lambda s: None) -> TuneResult:
    """Nested search, final search on all data, final run; ``storage`` defaults to SQLite in the tune folder."""
    optuna = _optuna()
    t0, cpu0 = time.monotonic(), _cpu_minutes()
    tune_dir = Path(tune_dir or tune_dir_for(cfg))
    _check_same(tune_dir, cfg, search)
    storage = storage or f"sqlite:///{(tune_dir / 'study.db').resolve()}"
    trials = trials or search.trials
    data_for = _Data(cfg)
    data = data_for(cfg)
    m, device = data.manifest, pick_device(cfg.train.device)
    outer = make_split(m, _kfold(cfg, search.outer_folds), data.dup_groups)
    log(f"{len(m)} images; {len(outer.folds)} outer folds grouped by {outer.grouped_by or 'nothing (IMAGE-LEVEL)'}, "
        f"{search.inner_folds} inner folds, {trials} trials per search")
    (tune_dir / "outer").mkdir(exist_ok=True)
    searches_left = len(outer.folds) + 1

    def timeout() -> float | None:
        return None if budget_s is None else (budget_s - (time.monotonic() - t0)) / searches_left

    held, per_fold = [], []
    for f in outer.folds:
        name, done_file = f"outer-{f.index}", tune_dir / "outer" / f"fold{f.index}.csv"
        rows = np.sort(np.concatenate([f.train, f.val]))
        folds = _inner_folds(cfg, data, rows, search.inner_folds)
        study = _search(name, _objective(cfg, search, data_for, folds, tune_dir, device, optuna), search, storage,
                        trials, timeout(), len(folds), log)
        searches_left -= 1
        if not done_file.is_file():  # refit the fold's best recipe on its whole training part, score held-out rows
            best = recipe_config(cfg, study.best_params)
            d = data_for(best)
            probs = _fit_and_score(best, d, f, tune_dir, device)
            frame = pd.DataFrame(probs, columns=[f"prob_{c}" for c in m.classes]).assign(
                index=f.test, label=m.labels[f.test], inner=study.best_value)
            frame.to_csv(done_file, index=False)
        frame = pd.read_csv(done_file)
        held.append(frame)
        probs = frame[[f"prob_{c}" for c in m.classes]].to_numpy()
        per_fold.append({"fold": f.index, "inner_best": float(frame["inner"].iloc[0]),
                         "test": _score(search.metric, frame["label"].to_numpy(), probs, m.classes),
                         "params": study.best_params})
        log(f"outer fold {f.index + 1}/{len(outer.folds)}: held-out {search.metric} {per_fold[-1]['test']:.3f}")
    pooled = pd.concat(held)
    nested = classification_metrics(pooled["label"].to_numpy(), pooled[[f"prob_{c}" for c in m.classes]].to_numpy(),
                                    m.classes, cfg.evaluate.positive_classes, cfg.evaluate.bootstrap or 1000,
                                    search.seed)
    nested["per_fold"] = per_fold
    final_folds = _inner_folds(cfg, data, np.arange(len(m)), search.inner_folds)
    study = _search("final", _objective(cfg, search, data_for, final_folds, tune_dir, device, optuna), search,
                    storage, trials, timeout(), len(final_folds), log)
    recipe = study.best_params
    chosen = recipe_config(cfg, recipe)
    atomic_write_text(tune_dir / "recipe.yaml", recipe_yaml(chosen, recipe))
    study.trials_dataframe().to_csv(tune_dir / "leaderboard.csv", index=False)
    run_dir = tune_dir / "final"
    if run_finished(run_dir):
        run = RunResult(run_dir, json.loads((run_dir / "metrics.json").read_text()), m.classes)
    else:
        shutil.rmtree(run_dir, ignore_errors=True)  # a final run cut short: trained again from the start
        run = run_experiment(chosen, run_dir, data=data_for(chosen), log=log)
    summary = {"nested": {k: nested[k] for k in ("accuracy", "accuracy_ci95", "balanced_accuracy", "roc_auc",
                                                   "n", "per_fold")},
               "naive": {"metric": search.metric, "value": study.best_value},
               "recipe": recipe, "run": str(run_dir), "storage": storage, "trials_per_search": trials,
               "seconds": time.monotonic() - t0, "cpu_minutes": _cpu_minutes() - cpu0}
    atomic_write_text(tune_dir / "tune.json", json.dumps(summary, indent=1))
    return TuneResult(tune_dir, nested, study.best_value, recipe, run, summary)
