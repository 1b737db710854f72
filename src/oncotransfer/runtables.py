"""Leaf module: the typed reads of a run's CSV tables (``predictions.csv``, ``split.csv``).

Labels, predictions and paths are strings: a class named ``NA`` or ``null`` must not come back as a missing
value (pandas' default), so every cell is read as text and only the numeric columns are converted, each checked.
A damaged cell is one line naming the file, the row and the column, never a traceback deep in the metrics.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from oncotransfer.errors import CheckpointError
from oncotransfer.io import read_csv

PREDICTIONS, SPLIT = "predictions.csv", "split.csv"
RETRAIN = "retrain the run (oncotransfer train CONFIG), or copy the whole run directory again"
_SHA = re.compile(r"^[0-9a-f]{64}$")
_PHASH = re.compile(r"^[0-9a-f]{1,16}$")


def read_text_table(path: Path, fix: str = RETRAIN) -> pd.DataFrame:
    """Every cell as a string, empty cells as ''; a file that is not a CSV table is one line naming it."""
    try:
        # io.read_csv undoes the quote that keeps formula-like cells inert in spreadsheets (io.csv_cell)
        df = read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; {fix}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable CSV table ({str(e).splitlines()[0][:80]}); the file is "
                              f"damaged: {fix}") from None
    return df


def _bad(path: Path, df: pd.DataFrame, mask: np.ndarray, column: str, why: str, fix: str) -> CheckpointError:
    i = int(np.nonzero(mask)[0][0])
    return CheckpointError(f"{path}: row {i + 2}, column {column}: {df[column].iloc[i]!r} {why} "
                           f"({int(mask.sum())} such cells); the file is damaged or was edited by hand: {fix}")


def _numbers(path: Path, df: pd.DataFrame, column: str, fix: str, *, empty_ok: bool = False,
             lo: float = -np.inf, hi: float = np.inf, integer: bool = False) -> None:
    text = df[column].str.strip()
    values = pd.to_numeric(text.where(text != "", None), errors="coerce").to_numpy(float)
    empty = (text == "").to_numpy()
    bad = (~np.isfinite(values) | (values < lo) | (values > hi)) & ~(empty & empty_ok)
    if integer:
        bad |= np.isfinite(values) & (values != np.round(values))
    if bad.any():
        what = "an integer" if integer else f"a number in [{lo:g}, {hi:g}]"
        raise _bad(path, df, bad, column, f"is not {what}", fix)
    df[column] = values.astype(np.int64) if integer and not empty.any() else values


def read_predictions(path: str | Path, classes: Sequence[str] | None = None, fix: str = RETRAIN) -> pd.DataFrame:
    """``predictions.csv`` (or a table of its layout, ``predictions_table``): text columns as strings,
    ``prob_*`` finite in [0, 1], ``cal_prob_*`` too or empty, ``fold`` integers, ``ood_score`` numbers or empty,
    ``label`` and ``pred`` each one of ``classes`` (when given)."""
    path = Path(path)
    df = read_text_table(path, fix)
    probs = [c for c in df.columns if c.startswith("prob_")]
    need = ["path"] + ([f"prob_{c}" for c in classes] if classes else probs[:1] or ["prob_<class>"])
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise CheckpointError(f"{path}: no column {missing[0]} (columns: {', '.join(df.columns[:8])}); the file "
                              f"is damaged: {fix}")
    for c in df.columns:
        if c.startswith("prob_"):
            _numbers(path, df, c, fix, lo=0.0, hi=1.0)
        elif c.startswith("cal_prob_"):
            _numbers(path, df, c, fix, lo=0.0, hi=1.0, empty_ok=True)
        elif c == "ood_score":
            _numbers(path, df, c, fix, empty_ok=True)
        elif c == "fold":
            _numbers(path, df, c, fix, lo=0, integer=True)
    for c in ("label", "pred"):
        if c in df.columns and classes:
            bad = (~df[c].isin(list(classes))).to_numpy()
            if bad.any():
                raise _bad(path, df, bad, c, f"is not one of the run's classes {list(classes)}", fix)
    if "in_distribution" in df.columns:
        df["in_distribution"] = df["in_distribution"].map({"True": True, "False": False}).astype(object)
    return df


def check_split(run_dir: str | Path) -> pd.DataFrame:
    """``RUN/split.csv``, its hashes checked: the overlap check of ``evaluate --data`` compares against them,
    so a garbage hash would quietly let a training image through. A missing file is an error, not a skipped
    check (train always writes it: its absence means an incomplete copy of the run)."""
    path = Path(run_dir) / SPLIT
    fix = "copy the whole run directory again (split.csv too), or retrain the run"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing, so --data cannot be checked for overlap with the images the run "
                              f"trained on; {fix}")
    df = read_text_table(path, fix)
    for c in ("path", "fold", "subset"):
        if c not in df.columns:
            raise CheckpointError(f"{path}: no column {c}; the file is damaged: {fix}")
    _numbers(path, df, "fold", fix, lo=0, integer=True)
    for c, pattern, what in (("sha256", _SHA, "a sha256 (64 hex digits)"), ("phash", _PHASH, "a pHash (hex)")):
        if c in df.columns:
            bad = (~df[c].str.fullmatch(pattern.pattern)).to_numpy()
            if bad.any():
                raise _bad(path, df, bad, c, f"is not {what}", fix)
    return df


def predictions_table(paths: Sequence[str], probs: np.ndarray, classes: Sequence[str], *,
                      labels: Sequence[str] | None = None, fold: int | None = None,
                      calibrated: np.ndarray | None = None, ood_scores: np.ndarray | None = None,
                      in_distribution: np.ndarray | None = None) -> pd.DataFrame:
    """The one layout of a predictions table (``predictions.csv``, ``predict``'s CSV, external scoring):
    [fold,] path, [label,] pred, ``prob_<class>`` per class, and ``cal_prob_<class>`` when calibrated
    probabilities exist, then ``ood_score`` (higher = more unusual) and ``in_distribution`` (True/False; empty
    without a threshold) when the model has an out-of-distribution detector. ``probs``: (N, C) in ``classes`` order."""
    probs = np.asarray(probs).reshape(len(paths), len(classes))
    cols: dict[str, Any] = {} if fold is None else {"fold": fold}
    cols["path"] = list(paths)
    if labels is not None:
        cols["label"] = list(labels)
    cols["pred"] = [classes[k] for k in probs.argmax(1)] if len(probs) else []
    df = pd.DataFrame(cols)
    for c, name in enumerate(classes):
        df[f"prob_{name}"] = probs[:, c]
    if calibrated is not None:
        calibrated = np.asarray(calibrated)
        for c, name in enumerate(classes):
            df[f"cal_prob_{name}"] = calibrated[:, c]
    if ood_scores is not None:
        df["ood_score"] = np.asarray(ood_scores, dtype=float).reshape(-1)
        df["in_distribution"] = (pd.Series([None] * len(df), dtype=object) if in_distribution is None
                                 else pd.Series(np.asarray(in_distribution, dtype=bool)).astype(object))
    return df
