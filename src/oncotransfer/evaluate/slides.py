"""Slide-level scores from tile probabilities: the aggregation rule and slide-level metrics (pure, no model)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from oncotransfer.errors import ConfigError, DataError
from oncotransfer.io import atomic_to_csv, read_csv
from oncotransfer.evaluate.metrics import classification_metrics, resolve_positive


def parse_aggregate(spec: str) -> tuple[str, int]:
    """``mean`` -> ("mean", 0); ``topk:K`` -> ("topk", K)."""
    s = str(spec).strip().lower()
    if s == "mean":
        return "mean", 0
    if s.startswith("topk:") and s[5:].isdigit() and int(s[5:]) > 0:
        return "topk", int(s[5:])
    raise ConfigError(f"aggregate {spec!r}: expected mean or topk:K (K a positive number of tiles, e.g. topk:10)")


def describe_aggregate(spec: str, classes: list[str], positive_classes: list[str] | None = None) -> str:
    kind, k = parse_aggregate(spec)
    if kind == "mean":
        return "mean of the tile probabilities"
    pos = resolve_positive(classes, positive_classes)
    if pos:
        return f"mean probabilities of the {k} tiles most likely {' + '.join(pos)}"
    return f"per class, the mean of its {k} highest tile probabilities, renormalised to sum to 1"


def aggregate(probs: np.ndarray, classes: list[str], spec: str = "mean",
              positive_classes: list[str] | None = None) -> np.ndarray:
    """(N, C) tile probabilities -> (C,) slide probabilities. ``topk:K`` ranks tiles by the positive
    class(es) (a small tumour focus decides the slide, as a pathologist would read it); without a positive
    class (multi-class) each class takes the mean of its own top K, renormalised."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) == 0:
        raise DataError("aggregate: a slide needs at least one tile probability row")
    kind, k = parse_aggregate(spec)
    if kind == "mean":
        return probs.mean(0)
    k = min(k, len(probs))
    pos = resolve_positive(classes, positive_classes)
    if pos:
        score = probs[:, [classes.index(p) for p in pos]].sum(1)
        top = np.argsort(-score, kind="stable")[:k]
        return probs[top].mean(0)
    s = -np.sort(-probs, axis=0)[:k].mean(0)
    return s / s.sum() if s.sum() > 0 else np.full(len(classes), 1 / len(classes))


def slide_table(tiles: pd.DataFrame, classes: list[str], spec: str = "mean",
                positive_classes: list[str] | None = None) -> pd.DataFrame:
    """One row per (fold, slide) of a tile predictions frame with ``slide``, ``label`` and ``prob_<class>``:
    label (its tiles' label: the most frequent one where tiles disagree), tiles, mixed, pred, prob_<class>."""
    cols = [f"prob_{c}" for c in classes]
    rows = []
    for (fold, slide), part in tiles.groupby(["fold", "slide"], sort=True):
        p = aggregate(part[cols].to_numpy(float), classes, spec, positive_classes)
        counts = part["label"].astype(str).value_counts()
        rows.append({"fold": fold, "slide": slide, "label": counts.index[0], "tiles": len(part),
                     "mixed": len(counts) > 1, "pred": classes[int(np.argmax(p))],
                     **{c: float(v) for c, v in zip(cols, p)}})
    return pd.DataFrame(rows)


def attach_slides(predictions: pd.DataFrame, data_path: str | None) -> pd.DataFrame:
    """Add the ``slide`` column from the data's manifest CSV (as written by ``slides tile``) when it has one;
    predictions are returned unchanged otherwise."""
    if "slide" in predictions.columns or not data_path:
        return predictions
    from oncotransfer.data.manifest import resolve_data_path
    try:
        p = resolve_data_path(str(data_path))
    except DataError:
        return predictions
    csv = p if p.is_file() else p / "manifest.csv"
    if csv.suffix.lower() != ".csv" or not csv.is_file():
        return predictions
    try:
        m = read_csv(csv, dtype=str, keep_default_na=False)
    except (OSError, ValueError):
        return predictions
    if not {"path", "slide"} <= set(m.columns):
        return predictions
    base = csv.parent

    def key(path: str) -> str:
        q = Path(path)
        return os.path.normpath(str(q if q.is_absolute() else base / q))
    table = dict(zip(map(key, m["path"]), m["slide"]))
    slides = [table.get(key(p)) for p in predictions["path"].astype(str)]
    if any(s is None or s == "" for s in slides):
        return predictions
    return predictions.assign(slide=slides)


def slide_metrics(predictions: pd.DataFrame, classes: list[str], spec: str = "mean",
                  positive_classes: list[str] | None = None, bootstrap: int = 1000,
                  table_csv: Path | None = None) -> dict[str, Any] | None:
    """metrics.json's "slides" block (None without a ``slide`` column): slide label = its tiles' label,
    slide probabilities = ``spec`` over its tiles (one row per fold and slide, written to ``table_csv``),
    metrics pooled over folds."""
    parse_aggregate(spec)
    if "slide" not in predictions.columns:
        return None
    if "fold" not in predictions.columns:
        predictions = predictions.assign(fold=0)
    table = slide_table(predictions, classes, spec, positive_classes)
    if table_csv is not None:
        atomic_to_csv(table, table_csv, index=False)
    from oncotransfer.evaluate.plots import as_indices
    cols = [f"prob_{c}" for c in classes]
    kw = {"classes": classes, "positive_classes": positive_classes, "bootstrap": bootstrap}
    pooled = classification_metrics(as_indices(table["label"].to_numpy(), classes), table[cols].to_numpy(float), **kw)
    return {"aggregate": spec, "rule": describe_aggregate(spec, classes, positive_classes),
            "slides": int(table["slide"].nunique()), "mixed_label_slides": int(table["mixed"].sum()),
            "pooled": pooled}
