"""``tune --executor ray``: a study's trials run several at once, each inner fold one Ray task.

The driver keeps the study (ask/tell): it samples a recipe, sends the trial's first inner fold to Ray, reports
each fold's score when its task returns and asks the pruner before sending the next, exactly as a local trial
does. Tasks load the images themselves (once per worker process and image size) and return only the held-out
probabilities, so nodes need no shared filesystem."""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from oncotransfer.config import ExperimentConfig
from oncotransfer.data.splits import Fold
from oncotransfer.errors import ConfigError, MissingExtraError, OncoError
from oncotransfer.experiments.tune_space import recipe_config, sample
from oncotransfer.experiments.tune_trial import Data, Inner, fit_and_score, keep_oof, score
from oncotransfer.experiments.tune_workers import Duplicate, Surplus, claim_trial, counted_states
from oncotransfer.train.device import pick_device

_MEMO: dict[str, Any] = {"token": None, "data": None}  # per Ray worker process: the current tune's images


def _task(cfg: ExperimentConfig, fold: Fold, token: str) -> tuple[np.ndarray, str]:
    """Train one inner fold of one trial on a Ray worker -> (test-row probabilities, node/pid)."""
    import ray  # in a Ray worker, where Ray is installed

    if _MEMO["token"] != token:  # another tune: its images may differ
        _MEMO.update(token=token, data=Data(cfg))
    torch.set_num_threads(1)  # one CPU per task, as Ray reserved
    with tempfile.TemporaryDirectory(prefix="oncotransfer_tune_") as tmp:
        probs = fit_and_score(cfg, _MEMO["data"](cfg), fold, Path(tmp), pick_device(cfg.train.device))
    return probs, f"{ray.util.get_node_ip_address()}/{os.getpid()}"


def _import_ray():
    try:
        import ray  # an optional extra: imported only by a tune that asks for it
    except ImportError:
        raise MissingExtraError("--executor ray needs Ray: pip install 'oncotransfer[ray]'") from None
    return ray


def run_ray(study, inner: Inner, n_trials: int, timeout: float | None, tell: Callable, optuna,
            workers: int | None = None, address: str | None = None) -> None:
    """Up to ``workers`` trials in flight (default: the cluster's CPUs), until this worker's ``n_trials`` are
    asked, the study holds its count (other workers included) or ``timeout`` seconds have passed."""
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers}: give a whole number >= 1, or leave it out (no cap)")
    ray = _import_ray()
    started = False
    if not ray.is_initialized():
        kw: dict[str, Any] = {"include_dashboard": False} if address is None else {}
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING, **kw)
        except ConnectionError as e:
            raise ConfigError(f"--address {address}: cannot connect to a Ray cluster ({e})") from None
        started = True
    task = ray.remote(_task).options(num_cpus=1)
    slots = workers or max(1, math.floor(ray.cluster_resources().get("CPU", 1)))
    token, t0, asked, stopping = os.urandom(8).hex(), time.monotonic(), 0, False
    inflight: dict[Any, tuple[Any, ExperimentConfig, int, list[float]]] = {}
    data = inner.data_for(inner.base)
    try:
        while True:
            while not stopping and len(inflight) < slots and asked < n_trials and (
                    timeout is None or time.monotonic() - t0 < timeout) and not _full(study, inner.trials, optuna):
                trial, asked = study.ask(), asked + 1
                try:
                    claim_trial(trial, inner.trials, optuna)
                except Duplicate:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    continue
                except Surplus:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    stopping = True
                    break
                cfg = recipe_config(inner.base, sample(trial, inner.search.space))
                inflight[task.remote(cfg, inner.folds[0], token)] = (trial, cfg, 0, [], [])
            if not inflight:
                return
            [ref], _ = ray.wait(list(inflight), num_returns=1)
            trial, cfg, j, scores, held = inflight.pop(ref)
            try:
                probs, node = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if not isinstance(cause, OncoError):
                    raise
                tell(study, study.tell(trial, state=optuna.trial.TrialState.FAIL))  # as the local catch=
                continue
            trial.set_user_attr("ran_on", node)
            fold = inner.folds[j]
            scores.append(score(inner.search.metric, data.manifest.labels[fold.test], probs, data.manifest.classes))
            held.append(probs)
            trial.report(float(np.mean(scores)), j)
            if j == len(inner.folds) - 1:
                keep_oof(trial, held)
                tell(study, study.tell(trial, float(np.mean(scores))))
            elif trial.should_prune():
                tell(study, study.tell(trial, state=optuna.trial.TrialState.PRUNED))
            else:
                inflight[task.remote(cfg, inner.folds[j + 1], token)] = (trial, cfg, j + 1, scores, held)
    finally:
        for ref, (trial, *_rest) in inflight.items():  # an error or Ctrl-C: their trials are asked again
            ray.cancel(ref, force=True)
            try:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            except Exception:  # noqa: BLE001 - best effort; the study stays consistent either way
                pass
        if started:
            ray.shutdown()


def _full(study, trials: int, optuna) -> bool:
    return len(study.get_trials(deepcopy=False, states=counted_states(optuna))) >= trials
