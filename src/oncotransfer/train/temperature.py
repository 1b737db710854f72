"""Temperature scaling, fitted on validation logits only: pure functions on arrays, and the rule that chooses
one pooled temperature or one per fold (``choose_temperatures``).

The caller decides which rows are validation rows, and never passes test rows."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

from oncotransfer.errors import DataError

T_MIN, T_MAX = 0.05, 20.0
"""Bounds of the fitted temperature: outside them the validation set is too small or separable to say more."""


def _nll(logits: np.ndarray, y: np.ndarray, sigmoid: bool, t: float) -> float:
    z = logits / t
    if sigmoid:
        # -log sigmoid(z) for y = 1, -log(1 - sigmoid(z)) = -log sigmoid(-z) for y = 0; logaddexp is stable
        s = np.where(y == 1, -z, z)
        return float(np.mean(np.logaddexp(0.0, s)))
    z = z - z.max(axis=1, keepdims=True)
    # log sum exp = log(1 + the others' exp): log1p keeps a confident row's tiny loss instead of rounding it to 0,
    # so on a separable validation set the search still sees the loss falling all the way to T_MIN
    others = np.exp(z)
    others[np.arange(len(z)), z.argmax(axis=1)] = 0.0
    return float(np.mean(np.log1p(others.sum(axis=1)) - z[np.arange(len(y)), y]))


def fit_temperature(logits: np.ndarray, y: np.ndarray, sigmoid: bool) -> float:
    """The T in [T_MIN, T_MAX] minimising the NLL of softmax(logits / T) (or sigmoid(logit / T)).

    The NLL is convex in 1/T, hence unimodal in log T, so a bounded 1-D (Brent) search on log T finds the
    optimum; it is deterministic. ``logits``: (N, C), or (N,) / (N, 1) for a one-logit sigmoid head."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y).astype(int).reshape(-1)
    if sigmoid:
        z = z.reshape(-1)
    elif z.ndim != 2:
        raise DataError(f"fit_temperature: softmax logits must be (N, C), got shape {z.shape}")
    if len(z) == 0 or len(z) != len(y):
        raise DataError(f"fit_temperature: {len(z)} logits for {len(y)} labels; need the same, at least one")
    res = minimize_scalar(lambda log_t: _nll(z, y, sigmoid, float(np.exp(log_t))),
                          bounds=(np.log(T_MIN), np.log(T_MAX)), method="bounded", options={"xatol": 1e-6})
    t = float(np.exp(res.x))
    for bound in (T_MIN, T_MAX):  # a loss as low at the bound: the optimum is there or beyond (at_bound says so)
        if _nll(z, y, sigmoid, bound) <= _nll(z, y, sigmoid, t):
            return bound
    return t


MIN_VAL_PER_FOLD, MIN_VAL_ERRORS_PER_FOLD = 200, 25
"""``evaluate.calibration: auto`` fits one temperature per fold only when every fold has at least 200 validation
images of which at least 25 are misclassified; otherwise one temperature on the pooled validation logits of all
folds. The NLL's hold on T comes mostly from the wrong predictions: in simulation (calibrated logits, accuracy
78-93%) the 90% range of refitted T spans a factor of about 1.6 (T ±25%) at 25-45 errors (200-400 images), 2.6-4
at 50 images; on busi-dev (51-53 validation images a fold) the per-fold fits spread over 0.38-1.14."""
BOUND_TOLERANCE = 0.02
"""A fitted T within 2% of T_MIN or T_MAX is "at the bound": the optimum lies at or beyond it."""
RULE = (f"auto: one temperature per fold only when every fold has at least {MIN_VAL_PER_FOLD} validation images, "
        f"{MIN_VAL_ERRORS_PER_FOLD} of them misclassified; otherwise one temperature fitted on the pooled validation "
        "logits of all folds")


def at_bound(t: float | None) -> str | None:
    """"lower" or "upper" when ``t`` lies within BOUND_TOLERANCE of T_MIN or T_MAX, else None."""
    if t is None:
        return None
    if t <= T_MIN * (1 + BOUND_TOLERANCE):
        return "lower"
    if t >= T_MAX * (1 - BOUND_TOLERANCE):
        return "upper"
    return None


def bound_warning(t: float, side: str, where: str, n: int) -> str:
    """One line for a temperature fitted at a bound of [T_MIN, T_MAX]: what it means, what to do."""
    why = ("the validation predictions are (nearly) all right, so the fit can only say 'sharper': calibrated "
           "probabilities will be near 0 or 1 even on wrong inputs" if side == "lower" else
           "the validation predictions are mostly wrong or carry no signal: calibrated probabilities are "
           "flattened towards uniform")
    return (f"calibration: temperature T = {t:.3g} at the {side} bound ({T_MIN:g}–{T_MAX:g}), fitted on {where} "
            f"({n} images): {why}; add validation images (split.val_size) or treat them with caution")


def _errors(logits: np.ndarray, y: np.ndarray, sigmoid: bool) -> int:
    z = np.asarray(logits, dtype=np.float64)
    pred = (z.reshape(-1) > 0).astype(int) if sigmoid else z.argmax(axis=1)
    return int(np.sum(pred != np.asarray(y).reshape(-1)))


@dataclass(frozen=True)
class TemperatureChoice:
    """The temperature applied to each fold (None: uncalibrated), and what run.json records about it."""
    temperatures: dict[str, float | None]
    record: dict[str, Any]
    warnings: list[str]

    def summary(self) -> str | None:
        """One terminal line: which temperature(s), fitted on what (None when nothing was calibrated)."""
        r = self.record
        if r.get("mode") == "pooled":
            return f"calibration: T = {r['temperature']:.3g} on the {r['fitted_on']}, {r['n_val_total']} images"
        if r.get("mode") == "per_fold":
            ts = ", ".join(f"{t:.3g}" for t in r["per_fold_fits"].values())
            return f"calibration: one T per fold ({ts}) on each fold's validation subset"
        return None


def choose_temperatures(val: Mapping[int, tuple[np.ndarray, np.ndarray] | None], sigmoid: bool,
                        mode: str = "auto") -> TemperatureChoice:
    """Temperatures for every fold from each fold's validation (logits, labels) (None: the fold has none).

    ``mode``: ``pooled`` fits one T on all folds' validation rows together (each scored by its own fold model)
    and applies it to every fold that has validation rows; ``per_fold`` fits each fold on its own rows;
    ``auto`` is ``per_fold`` when every fold has MIN_VAL_PER_FOLD validation images, MIN_VAL_ERRORS_PER_FOLD of
    them misclassified, else ``pooled``.
    Folds without validation rows stay uncalibrated (their test fold is never used). The per-fold fits are
    recorded in either mode, so a report can show how far they would have swung."""
    if mode not in ("auto", "pooled", "per_fold"):
        raise DataError(f"evaluate.calibration: {mode!r} is not one of auto, pooled, per_fold")
    n_val = {str(k): 0 if v is None else int(len(v[1])) for k, v in sorted(val.items())}
    have = {str(k): v for k, v in sorted(val.items()) if v is not None and len(v[1])}
    temps: dict[str, float | None] = dict.fromkeys(n_val)
    if not have:
        return TemperatureChoice(temps, {"mode": None, "requested": mode, "rule": RULE, "n_val": n_val}, [])
    per_fold = {k: fit_temperature(z, y, sigmoid) for k, (z, y) in have.items()}
    large = len(have) == len(val) and all(len(y) >= MIN_VAL_PER_FOLD and _errors(z, y, sigmoid) >= MIN_VAL_ERRORS_PER_FOLD
                                          for z, y in have.values())
    used = mode if mode != "auto" else ("per_fold" if large else "pooled")
    n_total = sum(n_val.values())
    if used == "per_fold":
        pooled = None
        temps.update(per_fold)
        bounds = {k: side for k, t in per_fold.items() if (side := at_bound(t))}
        warnings = [bound_warning(per_fold[k], side, f"the validation subset of fold {k}", n_val[k])
                    for k, side in bounds.items()]
        fitted_on = "validation subset of each fold"
    else:
        if len(have) > 1:  # each fold's rows scored by its own model, stacked: one NLL over all of them
            z = np.concatenate([np.asarray(z, dtype=np.float64).reshape(len(y), -1) for z, y in have.values()])
            y = np.concatenate([np.asarray(y).reshape(-1) for _, y in have.values()])
            pooled = fit_temperature(z.reshape(-1) if sigmoid else z, y, sigmoid)
            fitted_on = f"pooled validation subsets of {len(have)} folds (each scored by its own fold model)"
        else:
            pooled, fitted_on = next(iter(per_fold.values())), "validation subset"
        temps.update(dict.fromkeys(have, pooled))
        side = at_bound(pooled)
        bounds = {"pooled": side} if side else {}
        warnings = [bound_warning(pooled, side, f"the {fitted_on}", n_total)] if side else []
    record = {"mode": used, "requested": mode, "rule": RULE, "fitted_on": fitted_on, "n_val": n_val,
              "n_val_total": n_total, "temperature": pooled, "per_fold_fits": per_fold, "at_bound": bounds}
    return TemperatureChoice(temps, record, warnings)
