"""One tune trial: a sampled recipe trained on each inner fold in turn, pruned between folds; and the local
executor, which runs a study's trials one after the other in this process."""
from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from oncotransfer.config import ExperimentConfig
from oncotransfer.data.augment import Augmenter
from oncotransfer.data.splits import Fold, make_split
from oncotransfer.errors import ConfigError, OncoError
from oncotransfer.evaluate.metrics import classification_metrics
from oncotransfer.experiments.tune_cost import estimate_s, family, machine_factor
from oncotransfer.experiments.tune_space import defaults, recipe_config, sample
from oncotransfer.experiments.tune_workers import Surplus, claim_trial, counted_states
from oncotransfer.search_config import SearchConfig
from oncotransfer.train.data import LoadedData, load_data
from oncotransfer.train.fold import collect_outputs, train_fold


class Data:
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


@dataclass
class Inner:
    """What a search's trials are scored on: the base config, the inner folds (global rows) and the data."""
    base: ExperimentConfig
    search: SearchConfig
    data_for: Data
    folds: list[Fold]
    work: Path
    device: Any
    trials: int
    """The study's trial count, shared by all its workers."""
    deadline: float | None = None
    """``time.monotonic()`` at which the search's share of the budget is spent: a trial still running then stops
    after its current inner fold (pruned), unless the study has no finished trial yet."""
    max_trial_s: float | None = None
    """A recipe estimated (``tune_cost``) to take longer than this is skipped: its refit and the final run,
    which train it again on more data, would not fit the budget's reserve."""


def kfold(cfg: ExperimentConfig, folds: int):
    return cfg.split.model_copy(update={"kind": "kfold", "folds": folds})


def inner_folds(cfg: ExperimentConfig, data: LoadedData, rows: np.ndarray, k: int) -> list[Fold]:
    """Grouped k-fold over ``rows`` (the outer training part), as global row indices."""
    m = data.manifest
    split = make_split(m.subset(rows), kfold(cfg, k), data.dup_groups[rows])
    return [Fold(f.index, rows[f.train], rows[f.val], rows[f.test]) for f in split.folds]


def fit_and_score(cfg: ExperimentConfig, data: LoadedData, fold: Fold, work: Path, device) -> np.ndarray:
    """Train ``fold`` with ``cfg`` (in a scratch folder: its fit state is not kept) -> test-row probabilities."""
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        res = train_fold(cfg, data, fold, Path(tmp), device, Augmenter(cfg.augment))
        out = collect_outputs(res, data, cfg, device)
    return out.predictions[[f"prob_{c}" for c in data.manifest.classes]].to_numpy(dtype=np.float64)


def score(metric: str, y: np.ndarray, probs: np.ndarray, classes: list[str]) -> float:
    value = classification_metrics(y, probs, classes, bootstrap=0)[metric]
    return float(value) if value is not None and not math.isnan(value) else 0.0


def objective(inner: Inner, optuna) -> Callable:
    def run(trial) -> float:
        claim_trial(trial, inner.trials, optuna)  # before sampling: a surplus trial trains nothing
        params = sample(trial, inner.search.space)
        _skip_if_too_slow(inner, trial, {**defaults(inner.base), **params}, optuna)
        cfg = recipe_config(inner.base, params)
        data = inner.data_for(cfg)
        scores, held, t0 = [], [], time.monotonic()
        for j, fold in enumerate(inner.folds):
            probs = fit_and_score(cfg, data, fold, inner.work, inner.device)
            held.append(probs)
            scores.append(score(inner.search.metric, data.manifest.labels[fold.test], probs, data.manifest.classes))
            trial.report(float(np.mean(scores)), j)  # the pruner compares trials after the same inner folds
            if j < len(inner.folds) - 1 and (trial.should_prune() or _past_deadline(inner, trial, optuna)):
                raise optuna.TrialPruned()
        trial.set_user_attr("seconds", time.monotonic() - t0)
        keep_oof(trial, held)
        return float(np.mean(scores))
    return run


OOF = "oof"
"""A completed trial's held-out probabilities of every inner fold, in fold order (``tune_ensemble``)."""


def keep_oof(trial, probs: list[np.ndarray]) -> None:
    """Keep them with 6 decimals: a few kB a trial in the study."""
    trial.set_user_attr(OOF, np.round(np.concatenate(probs), 6).tolist())


def _skip_if_too_slow(inner: Inner, trial, params: dict, optuna) -> None:
    """Prune a recipe before it trains when its estimated time (``tune_cost``, scaled by this study's finished
    trials) exceeds what is left of the search's share, or ``max_trial_s``; the reason is kept on the trial.
    Never the study's first trial to finish: a search always has an answer."""
    raw = estimate_s(params, int(np.mean([len(f.train) for f in inner.folds])), len(inner.folds))
    trial.set_user_attr("estimate_s", raw)
    trial.set_user_attr("family", family(params))
    finished = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not finished:
        return
    need = raw * machine_factor(finished, family(params))
    left = None if inner.deadline is None else inner.deadline - time.monotonic()
    limits = [(left, "left in this search"), (inner.max_trial_s, "allowed a trial so that its final run fits")]
    for limit, what in limits:
        if limit is not None and need > limit:
            trial.set_user_attr("skipped", f"needs about {need / 60:.1f} min, {max(limit, 0) / 60:.1f} min {what}")
            raise optuna.TrialPruned()


def _past_deadline(inner: Inner, trial, optuna) -> bool:
    """The budget's share is spent (Optuna's timeout only stops new trials: one slow recipe would overrun it by
    its whole length) and another trial already finished, so the search has an answer without this one."""
    if inner.deadline is None or time.monotonic() < inner.deadline:
        return False
    done = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return len(done) > 0


def run_local(study, inner: Inner, n_trials: int, timeout: float | None, tell: Callable, optuna) -> None:
    """The study's trials one after the other in this process."""
    if timeout is not None:
        inner = dataclasses.replace(inner, deadline=time.monotonic() + timeout)
    # Counting RUNNING trials too, a worker stops once the trials of all workers make the count.
    stop = optuna.study.MaxTrialsCallback(inner.trials, states=counted_states(optuna))
    study.optimize(objective(inner, optuna), n_trials=n_trials, timeout=timeout, catch=(OncoError, Surplus),
                   callbacks=[stop, tell])
