"""How far to trust a run's predictions: metrics.json's ``calibration`` block (ECE before and after temperature
scaling, with bootstrap CIs, and how the temperatures were fitted) and its ``selective`` block (accuracy against
coverage), from a predictions frame."""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from oncotransfer.errors import DataError
from oncotransfer.evaluate.calibration import ece_bootstrap_ci, expected_calibration_error
from oncotransfer.evaluate.plots import as_indices
from oncotransfer.evaluate.selective import selective_summary


def prediction_arrays(predictions: pd.DataFrame, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(y_true, y_prob)`` from a predictions frame with ``label`` (class names) and ``prob_<class>`` columns."""
    cols = [f"prob_{c}" for c in classes]
    missing = [c for c in ["label", *cols] if c not in predictions.columns]
    if missing:
        raise DataError(f"predictions: missing column(s) {missing}; expected 'label' and one prob_<class> "
                        f"column for each of {classes}")
    return as_indices(predictions["label"].astype(str).to_numpy(), classes), predictions[cols].to_numpy(float)


def calibration_summary(predictions: pd.DataFrame, classes: list[str], info: dict[str, Any], n_bins: int,
                        n_boot: int = 1000) -> tuple[dict[str, Any], np.ndarray | None]:
    """metrics.json's "calibration" block and the pooled calibrated probabilities (None when there are none).

    ``cal_prob_<class>`` columns exist for the folds that have a temperature; rows of any fold without one
    keep their uncalibrated probabilities in ``ece_after`` (said in the note). The ECEs get bootstrap 95% CIs
    (``n_boot`` resamples, the same ones before and after). How the temperatures were fitted comes from
    run.json's ``calibration`` record (``train.temperature.choose_temperatures``)."""
    y_true, y_prob = prediction_arrays(predictions, classes)
    cols = [f"cal_prob_{c}" for c in classes]
    cal = None
    if all(c in predictions.columns for c in cols) and predictions[cols].notna().all(axis=1).any():
        cal = predictions[cols].to_numpy(float)
        missing = np.isnan(cal).any(axis=1)
        cal[missing] = y_prob[missing]
    temps = info.get("temperatures") or {}
    rec = info.get("calibration") or {}
    out = {"ece_before": expected_calibration_error(y_true, y_prob, n_bins),
           "ece_before_ci95": ece_bootstrap_ci(y_true, y_prob, n_bins, n_boot),
           "ece_after": expected_calibration_error(y_true, cal, n_bins) if cal is not None else None,
           "ece_after_ci95": ece_bootstrap_ci(y_true, cal, n_bins, n_boot) if cal is not None else None,
           "temperatures": temps, "fitted_on": rec.get("fitted_on", "validation subset of each fold"), "bins": n_bins}
    out.update({k: rec[k] for k in ("mode", "requested", "rule", "n_val_total", "per_fold_fits", "at_bound") if k in rec})
    if cal is None:
        out["note"] = ("not calibrated: no validation split" if rec.get("enabled", True)
                       else "not calibrated: evaluate.calibrate is false")
    elif missing.any():
        folds = sorted(map(str, predictions.loc[missing, "fold"].unique()))
        out["note"] = f"fold(s) {', '.join(folds)} not calibrated (no validation subset); uncalibrated there"
    return out, cal


def temperature_text(cal: dict[str, Any]) -> str:
    """"T = 0.849 fitted on the ...; fitted per fold they would range 0.383–1.145" for the report's headline."""
    vals = [float(t) for t in (cal.get("temperatures") or {}).values() if t is not None]
    if not vals:
        return ""
    text = f"T = {vals[0]:.3f}" if max(vals) == min(vals) else f"T = {min(vals):.3f}–{max(vals):.3f} over {len(vals)} folds"
    text += f" fitted on the {cal.get('fitted_on', 'validation subset of each fold')}"
    fits = [float(t) for t in (cal.get("per_fold_fits") or {}).values()]
    if cal.get("mode") == "pooled" and len(fits) > 1:
        text += f"; fitted per fold they would range {min(fits):.3f}–{max(fits):.3f}"
    if cal.get("at_bound"):
        text += "; ⚠ at a bound of the fitted range, see Warnings"
    return text


def selective_block(predictions: pd.DataFrame, y_true: np.ndarray, y_prob: np.ndarray, cal: np.ndarray | None,
                    n_boot: int) -> dict[str, Any]:
    """metrics.json's "selective" block (``evaluate.selective``): confidence is the top calibrated probability
    where there is one, else the top probability; the ``ood_score`` column, when present, is the other order."""
    ood = predictions["ood_score"].to_numpy(float) if "ood_score" in predictions.columns else None
    out = selective_summary(y_true, y_prob, (cal if cal is not None else y_prob).max(axis=1), ood, n_boot)
    out["confidence"] = "top calibrated probability" if cal is not None else "top probability"
    return out
