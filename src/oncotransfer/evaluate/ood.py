"""What a predictions table says about out-of-distribution inputs: how many were flagged, and how the flagged
and unflagged parts score (pure functions on a predictions frame; the detectors are ``models.ood``)."""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, balanced_accuracy_score


def _part(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    n = int(len(y_true))
    if n == 0:
        return {"n": 0, "accuracy": None, "balanced_accuracy": None}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a part may predict a class it does not hold
        bal = float(balanced_accuracy_score(y_true, y_pred)) if len(np.unique(y_true)) > 1 else None
    return {"n": n, "accuracy": float(accuracy_score(y_true, y_pred)), "balanced_accuracy": bal}


def ood_summary(predictions: pd.DataFrame, detector: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """``{scored, flagged, flagged_share, in_distribution: {n, accuracy, ...}, out_of_distribution: {...}}``
    from the ``ood_score`` / ``in_distribution`` columns (None when the predictions have none). Accuracy uses
    the ``pred`` column against ``label`` when labels exist. ``detector``: what ood.json says, kept beside."""
    if "ood_score" not in predictions.columns:
        return None
    flags = predictions.get("in_distribution")
    known = flags is not None and flags.notna().all() and len(flags) > 0
    out: dict[str, Any] = {"scored": int(len(predictions)), "detector": detector,
                           "mean_score": float(predictions["ood_score"].mean()) if len(predictions) else None}
    if not known:
        out.update({"flagged": None, "flagged_share": None,
                    "note": "no threshold (the run had no validation subset to set it on)"})
        return out
    inside = flags.astype(str).str.lower().isin(["true", "1"]).to_numpy()
    out.update({"flagged": int((~inside).sum()), "flagged_share": float((~inside).mean())})
    if "label" in predictions.columns and "pred" in predictions.columns:
        y, p = predictions["label"].astype(str).to_numpy(), predictions["pred"].astype(str).to_numpy()
        out["in_distribution"] = _part(y[inside], p[inside])
        out["out_of_distribution"] = _part(y[~inside], p[~inside])
    return out


def ood_lines(summary: dict[str, Any] | None, external: bool) -> list[str]:
    """Report lines for ``ood_summary``: what was flagged and how each part scored."""
    if not summary:
        return []
    det = summary.get("detector") or {}
    lines = []
    if det:
        params = ", ".join(f"{k}={v}" for k, v in (det.get("params") or {}).items())
        setting = det.get("setting") or {}
        own = [v for v in (setting.get("per_fold") or {}).values() if v is not None]
        where = (f"the pooled validation images of all folds ({setting.get('n_val')} images, each scored by its "
                 f"own fold's detector; fold by fold alone the thresholds would range {min(own):.3f}-{max(own):.3f})"
                 if setting.get("pooled") and own else "each fold's validation images")
        lines.append(f"Detector: {det.get('detector')}{f' ({params})' if params else ''} on {det.get('features')}; "
                     f"threshold: the score {det.get('pass_rate', 0.95):.0%} of {where} stay under (validation "
                     "images only)")
    if summary.get("flagged") is None:
        lines.append(f"Out of distribution: not flagged ({summary.get('note')})")
        return lines
    what = "images" if external else "test images (each scored by its own fold's detector)"
    lines.append(f"Flagged out of distribution: {summary['flagged']} of {summary['scored']} {what} "
                 f"({summary['flagged_share']:.1%})" + ("" if external else
                                                          f"; about {1 - det.get('pass_rate', 0.95):.0%} is "
                                                          "expected of images like the training data"))
    for key, label in (("in_distribution", "in distribution"), ("out_of_distribution", "out of distribution")):
        part = summary.get(key)
        if part and part["n"]:
            lines.append(f"Accuracy {label}: {part['accuracy']:.3f} on {part['n']} images")
    return lines
