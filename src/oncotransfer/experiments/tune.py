"""``oncotransfer tune``: an Optuna search over recipes, evaluated honestly by nested cross-validation.

Outer grouped folds (the split's own grouping: patients or near-duplicate images) each hold out a test part; a
whole search (TPE, pruned after each inner fold) runs on the rest, what it chose (its best trial, or the mean of
its top trials: ``tune_ensemble``) is refitted there and scored on the held-out part. The pooled held-out
predictions give the nested estimate. One more search on all data chooses the final model (its inner score is the
naive figure), which is trained as a normal run directory (an ensemble: ``recipe_merge``)."""
from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from oncotransfer.config import ExperimentConfig, to_dict
from oncotransfer.data.splits import make_split
from oncotransfer.errors import ConfigError, MissingExtraError
from oncotransfer.evaluate.metrics import classification_metrics
from oncotransfer.experiments.run import RunResult, run_experiment
from oncotransfer.experiments.recipe_merge import merge_runs
from oncotransfer.experiments.tune_cost import base_params
from oncotransfer.experiments.tune_ensemble import affordable, choose_members
from oncotransfer.experiments.tune_ray import run_ray
from oncotransfer.experiments.tune_report import leaderboard, write_tune_report
from oncotransfer.experiments.tune_space import defaults, recipe_config, recipe_yaml
from oncotransfer.experiments.tune_trial import Data, Inner, fit_and_score, inner_folds, kfold, run_local, score
from oncotransfer.experiments.tune_workers import reap_dead_trials, storage_for, wait_for, worker_sampler
from oncotransfer.io import atomic_write_text
from oncotransfer.progress import Progress
from oncotransfer.rundir import run_finished
from oncotransfer.search_config import SearchConfig
from oncotransfer.train.device import pick_device

EXECUTORS: dict[str, Callable[..., None]] = {"local": run_local, "ray": run_ray}
"""How a study's trials run: one after the other here, or as Ray tasks (several at once, on a cluster)."""


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


def _pruner(name: str, n_folds: int, optuna):
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=n_folds, reduction_factor=3)
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)


def _search(name: str, inner: Inner, storage, timeout: float | None, run_trials: Callable[..., None],
            say: Callable[[str], None], progress: Progress | None):
    """Run (or continue) one study to ``trials`` finished trials, shared with every worker on ``storage``: those
    already COMPLETE or PRUNED are not rerun, those RUNNING elsewhere are not started again."""
    optuna, search, trials = _optuna(), inner.search, inner.trials
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = worker_sampler(search.seed, optuna)
    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True, direction="maximize",
                                sampler=sampler, pruner=_pruner(search.pruner, len(inner.folds), optuna))
    reap_dead_trials(study, optuna)
    if not study.get_trials(deepcopy=False):  # a new study: the config's own recipe first (skipped if queued)
        study.enqueue_trial(base_params(inner.base, search.space, defaults(inner.base)), skip_if_exists=True)
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=states))
    t0 = time.monotonic()

    def tell(study, trial) -> None:
        if trial.state not in states:
            return
        finished = study.get_trials(deepcopy=False, states=states)
        best = max((t.value for t in finished if t.state == states[0]), default=None)
        left = "" if timeout is None else f", {max(0.0, timeout - (time.monotonic() - t0)) / 60:.1f} min left"
        skipped = trial.user_attrs.get("skipped")
        say(f"{name}: trial {trial.number} " + (f"skipped ({skipped})" if skipped else trial.state.name.lower())
            + (f" {search.metric} {trial.value:.3f}" if trial.value is not None else "")
            + ("" if best is None else f", best {best:.3f}") + f" ({len(finished)}/{trials}{left})")
        if progress is not None:
            progress(f"{name} trials", min(len(finished), trials), trials)

    if done < trials and (timeout is None or timeout > 0):
        if progress is not None:
            progress(f"{name} trials", done, trials)
        run_trials(study, inner, trials - done, timeout, tell, optuna)
    _settle(study, optuna, say, name)
    finished = study.get_trials(deepcopy=False, states=states)
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in finished):
        raise ConfigError(f"tune: search {name} finished no trial in its budget; give a larger --budget or a "
                          "smaller search space (fewer epochs, one backbone)")
    say(f"{name}: {len(finished)} trial(s) ({sum(t.state == states[1] for t in finished)} pruned), "
        f"best inner {search.metric} {study.best_value:.3f}")
    return study


def _settle(study, optuna, say: Callable[[str], None], name: str, poll_s: float = 2.0) -> None:
    """Wait for the trials other workers still run, so that every worker reads the same best trial."""
    told = False
    while True:
        reap_dead_trials(study, optuna)
        optuna.storages.fail_stale_trials(study)
        running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if not running:
            return
        if not told:
            say(f"{name}: waiting for {len(running)} trial(s) of other workers")
            told = True
        time.sleep(poll_s)


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
    """A tune folder continues only the tune it was started with (trials, budget and ensemble may change)."""
    record = {"config": to_dict(cfg),
              "search": search.model_dump(mode="json", exclude={"trials", "budget", "ensemble"})}
    saved = tune_dir / "tune_config.json"
    if saved.is_file():
        if json.loads(saved.read_text()) != json.loads(json.dumps(record)):
            raise ConfigError(f"{tune_dir} holds a tune of another config or search; give another name "
                              "(--set name=...) or remove that folder")
        return
    tune_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, json.dumps(record, indent=1))


REFIT_SHARE = 0.25
"""Share of ``--budget`` kept for the outer refits and the final run, so the budget bounds the whole tune: with
three outer and three inner folds each refit costs about a third of a trial, and the final run (the config's own
split, five folds) about two trials; a 30-minute search on busi-dev runs some 10-20 trials per search."""


def run_tune(cfg: ExperimentConfig, search: SearchConfig, *, trials: int | None = None,
             budget_s: float | None = None, storage: str | None = None, tune_dir: Path | None = None,
             executor: str = "local", workers: int | None = None, address: str | None = None,
             log: Callable[[str], None] = lambda s: None, progress: Progress | None = None) -> TuneResult:
    """Nested search, final search on all data, final run; ``storage`` defaults to SQLite in the tune folder.

    Every worker started on the same ``storage`` (and tune folder) runs this same call: the trials are shared
    (tune_workers), each refit and the final run is done by one of them, and all end with the same result."""
    if executor not in EXECUTORS:
        raise ConfigError(f"--executor {executor!r}: unknown executor; valid: {', '.join(sorted(EXECUTORS))}")
    optuna = _optuna()
    run_trials = _runner(executor, workers, address)
    t0, cpu0 = time.monotonic(), _cpu_minutes()
    tune_dir = Path(tune_dir or tune_dir_for(cfg))
    _check_same(tune_dir, cfg, search)
    storage = storage or f"sqlite:///{(tune_dir / 'study.db').resolve()}"
    store = _storage(storage, optuna)
    trials = trials or search.trials
    data_for = Data(cfg)
    data = data_for(cfg)
    m, device = data.manifest, pick_device(cfg.train.device)
    outer = make_split(m, kfold(cfg, search.outer_folds), data.dup_groups)
    log(f"{len(m)} images; {len(outer.folds)} outer folds grouped by {outer.grouped_by or 'nothing (IMAGE-LEVEL)'}, "
        f"{search.inner_folds} inner folds, {trials} trials per search, executor {executor}")
    (tune_dir / "outer").mkdir(exist_ok=True)
    searches_left = len(outer.folds) + 1

    def timeout() -> float | None:
        # the searches share the budget less REFIT_SHARE, kept for the outer refits and the final run
        return (None if budget_s is None else
                (budget_s * (1 - REFIT_SHARE) - (time.monotonic() - t0)) / searches_left)

    def inner_for(rows: np.ndarray) -> Inner:
        folds = inner_folds(cfg, data, rows, search.inner_folds)
        return Inner(cfg, search, data_for, folds, tune_dir, device, trials, max_trial_s=max_trial_s(folds))

    final_rows, final_fits = _final_size(cfg, len(m))

    def max_trial_s(folds) -> float | None:
        """A trial may cost what lets the final run (the config's split on all images, trained from scratch)
        fit 60% of the reserve (the refits take the rest): the final run's fits over a trial's, in rows."""
        if budget_s is None:
            return None
        ratio = final_fits * final_rows / sum(len(f.train) for f in folds)
        return budget_s * REFIT_SHARE * 0.6 / max(ratio, 1.0)

    studies, inners = [], []  # every search first: the refits wait for no one while other workers still run trials
    for f in outer.folds:
        inners.append(inner_for(np.sort(np.concatenate([f.train, f.val]))))
        studies.append(_search(f"outer-{f.index}", inners[-1], store, timeout(), run_trials, log, progress))
        searches_left -= 1
    final_inner = inner_for(np.arange(len(m)))
    study = _search("final", final_inner, store, timeout(), run_trials, log, progress)
    refit_rows = float(np.mean([len(f.train) for f in outer.folds]))
    cap = _ensemble_cap(tune_dir, lambda: affordable(
        study, final_inner, search.ensemble, None if budget_s is None else budget_s - (time.monotonic() - t0),
        [(final_rows, final_fits), (refit_rows, len(outer.folds))], optuna))

    held, per_fold = [], []
    for f, fold_study, inner in zip(outer.folds, studies, inners):
        done_file = tune_dir / "outer" / f"fold{f.index}.csv"

        def refit(f=f, fold_study=fold_study, inner=inner, done_file=done_file) -> None:
            """The fold's chosen trials (``tune_ensemble``) on its whole training part, their mean scored on its
            held-out rows."""
            members, tried = choose_members(fold_study, inner, cap, optuna)
            probs = np.mean([fit_and_score(c, data_for(c), f, tune_dir, device)
                             for c in (recipe_config(cfg, t.params) for t in members)], axis=0)
            frame = pd.DataFrame(probs, columns=[f"prob_{c}" for c in m.classes]).assign(
                index=f.test, label=m.labels[f.test], inner=_inner_score(fold_study, members, tried),
                members=" ".join(str(t.number) for t in members))
            atomic_write_text(done_file, frame.to_csv(index=False))

        wait_for(done_file.is_file, done_file.with_suffix(".lock"), refit, f"the refit of outer fold {f.index}", log)
        frame = pd.read_csv(done_file)
        held.append(frame)
        probs = frame[[f"prob_{c}" for c in m.classes]].to_numpy()
        per_fold.append({"fold": f.index, "inner_best": float(frame["inner"].iloc[0]),
                         "test": score(search.metric, frame["label"].to_numpy(), probs, m.classes),
                         "params": fold_study.best_params,
                         "members": [int(x) for x in str(frame["members"].iloc[0]).split()]
                         if "members" in frame.columns else [fold_study.best_trial.number]})
        log(f"outer fold {f.index + 1}/{len(outer.folds)}: held-out {search.metric} {per_fold[-1]['test']:.3f}")
    pooled = pd.concat(held)
    nested = classification_metrics(pooled["label"].to_numpy(), pooled[[f"prob_{c}" for c in m.classes]].to_numpy(),
                                    m.classes, cfg.evaluate.positive_classes, cfg.evaluate.bootstrap or 1000,
                                    search.seed)
    nested["per_fold"] = per_fold
    recipe = study.best_params
    chosen = recipe_config(cfg, recipe)
    members, tried = choose_members(study, final_inner, cap, optuna)
    atomic_write_text(tune_dir / "recipe.yaml", recipe_yaml(chosen, recipe))
    atomic_write_text(tune_dir / "leaderboard.csv", leaderboard(study, optuna).to_csv(index=False))
    run_dir = tune_dir / "final"
    member_dirs = [run_dir] if len(members) == 1 else [tune_dir / "members" / f"trial{t.number}" for t in members]
    if len(members) > 1:
        (tune_dir / "members").mkdir(exist_ok=True)
    for t, member_dir in zip(members, member_dirs):
        def train(c=recipe_config(cfg, t.params), member_dir=member_dir) -> None:
            shutil.rmtree(member_dir, ignore_errors=True)  # a final run cut short: trained again from the start
            run_experiment(c, member_dir, data=data_for(c), log=log)

        what = "the final run" if len(members) == 1 else f"the final run of trial {t.number}"
        wait_for(lambda d=member_dir: run_finished(d), member_dir.with_name(member_dir.name + ".lock"), train, what,
                 log)
    if len(members) > 1:
        described = [{"trial": t.number, "params": t.params, "inner": t.value} for t in members]
        wait_for(lambda: run_finished(run_dir), tune_dir / "final.lock",
                 lambda: merge_runs(run_dir, member_dirs, described), "the final ensemble", log)
    run = RunResult(run_dir, json.loads((run_dir / "metrics.json").read_text()), m.classes)
    naive = _inner_score(study, members, tried)
    summary = {"nested": {k: nested[k] for k in ("accuracy", "accuracy_ci95", "balanced_accuracy", "roc_auc",
                                                   "n", "per_fold")},
               "naive": {"metric": search.metric, "value": naive},
               "ensemble": {"cap": cap, "members": [{"trial": t.number, "inner": t.value, "params": t.params}
                                                    for t in members], "tried": tried},
               "recipe": recipe, "run": str(run_dir), "storage": _safe_url(storage), "trials_per_search": trials,
               "executor": executor, "seconds": time.monotonic() - t0, "cpu_minutes": _cpu_minutes() - cpu0}
    atomic_write_text(tune_dir / "tune.json", json.dumps(summary, indent=1))
    summary["report"] = str(write_tune_report(tune_dir, study, studies, summary, chosen, search, optuna))
    return TuneResult(tune_dir, nested, naive, recipe, run, summary)


def _final_size(cfg: ExperimentConfig, n: int) -> tuple[float, int]:
    """(training images per fit, fits) of a run with the config's own split on ``n`` images."""
    kfold_split = cfg.split.kind == "kfold"
    rows = n * (1 - cfg.split.val_size) * (1 - (1 / cfg.split.folds if kfold_split else cfg.split.test_size))
    return rows, (cfg.split.folds if kfold_split else 1)


def _inner_score(study, members: list, tried: list[dict]) -> float:
    """The chosen model's inner score: the best trial's, or the ensemble's mean prediction's."""
    return float(tried[len(members) - 1]["score"]) if len(members) > 1 else float(study.best_value)


def _ensemble_cap(tune_dir: Path, decide: Callable[[], int]) -> int:
    """The most trials an ensemble may average, decided once per tune (kept in ensemble_cap.json), so a resumed
    tune and every worker apply to the final search the rule its outer folds were refitted with."""
    path = tune_dir / "ensemble_cap.json"
    if not path.is_file():
        mine = tune_dir / f".ensemble_cap.{os.getpid()}.json"
        atomic_write_text(mine, json.dumps({"cap": int(decide())}))
        with contextlib.suppress(FileExistsError):  # the first worker's decision stands
            os.link(mine, path)
        mine.unlink()
    return int(json.loads(path.read_text())["cap"])


def _runner(executor: str, workers: int | None, address: str | None) -> Callable[..., None]:
    """The executor's trial loop with its options bound; an option it does not take fails before any work."""
    runner, options = EXECUTORS[executor], {}
    if executor == "local" and (workers is not None or address is not None):
        raise ConfigError(f"--{'workers' if workers is not None else 'address'} does not apply to the local "
                          "executor; give --executor ray")
    if executor == "ray":
        options = {"workers": workers, "address": address}

    def run_trials(study, inner: Inner, n_trials: int, timeout: float | None, tell: Callable, optuna) -> None:
        runner(study, inner, n_trials, timeout, tell, optuna, **options)
    return run_trials


def _storage(url: str, optuna):
    try:
        return storage_for(url, optuna)
    except ImportError as e:  # the URL's database driver (psycopg2 for postgresql://)
        raise MissingExtraError(f"--storage {_safe_url(url)}: its database driver is missing ({e}); "
                                "pip install 'oncotransfer[tune]'") from None
    except Exception as e:  # noqa: BLE001 - SQLAlchemy's errors: a bad URL, an unreachable server
        raise ConfigError(f"--storage {_safe_url(url)}: cannot open the study storage "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def _safe_url(url: str) -> str:
    """``url`` without its password (it goes into tune.json and error lines)."""
    return re.sub(r"(://[^:/@]+):[^@/]*@", r"\1:***@", url)
