"""Figures for reports. Built on ``matplotlib.figure.Figure`` so no pyplot state or GUI backend is touched."""
from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from oncotransfer.errors import DataError
from oncotransfer.evaluate.calibration import expected_calibration_error, reliability_bins
from oncotransfer.io import atomic_write_bytes

_HISTORY_COLUMNS = ("fold", "epoch", "train_loss", "train_acc", "val_loss", "val_acc")
_COLOURS = {"train": "tab:blue", "val": "tab:orange"}


def _curve(ax: Axes, per_epoch: pd.DataFrame, column: str, label: str, colour: str, n_folds: int) -> None:
    stats = per_epoch[column].agg(["mean", "min", "max"]).dropna()
    if stats.empty:
        return
    name = f"{label} (mean of {n_folds} folds)" if n_folds > 1 else label
    ax.plot(stats.index, stats["mean"], color=colour, label=name, marker="." if len(stats) < 30 else None)
    if n_folds > 1:
        ax.fill_between(stats.index, stats["min"], stats["max"], color=colour, alpha=0.15, linewidth=0)


def plot_history(history: pd.DataFrame, best_epochs: dict[int, int] | None = None) -> Figure:
    """Accuracy and loss per epoch (train and validation); several folds are drawn as the mean with a
    min–max band, and the best epoch(s) as dashed vertical lines."""
    missing = [c for c in _HISTORY_COLUMNS if c not in history.columns]
    if missing:
        raise DataError(f"history: missing column(s) {missing}; expected {list(_HISTORY_COLUMNS)}")
    n_folds = int(history["fold"].nunique())
    per_epoch = history.groupby("epoch")
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_acc, ax_loss = fig.subplots(1, 2)
    for ax, metric, title in ((ax_acc, "acc", "Accuracy"), (ax_loss, "loss", "Loss")):
        for split, label in (("train", "train"), ("val", "validation")):
            _curve(ax, per_epoch, f"{split}_{metric}", label, _COLOURS[split], n_folds)
        # One line per distinct epoch; only the first is labelled so the legend says it once.
        for i, epoch in enumerate(sorted(set((best_epochs or {}).values()))):
            ax.axvline(epoch, color="grey", linestyle="--", linewidth=1, label="best epoch" if i == 0 else None)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(title.lower())
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return fig


def plot_confusion(cm: list[list[int]] | np.ndarray, classes: list[str], title: str = "Confusion matrix") -> Figure:
    """Counts in every cell, coloured by the fraction of the true class (row-normalised)."""
    counts = np.asarray(cm, dtype=int)
    c = len(classes)
    if counts.shape != (c, c):
        raise DataError(f"plot_confusion: matrix has shape {counts.shape}, expected ({c}, {c}) for classes {classes}")
    rows = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=float), where=rows > 0)
    side = 2.5 + 0.9 * c
    fig = Figure(figsize=(side + 1, side), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(c):
        for j in range(c):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center",
                    color="white" if frac[i, j] > 0.5 else "black")
    ax.set_xticks(range(c), classes, rotation=30, ha="right")
    ax.set_yticks(range(c), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="fraction of true class")
    return fig


def as_indices(y_true: Sequence[Any] | np.ndarray, classes: list[str]) -> np.ndarray:
    """Class indices from indices or class names."""
    arr = np.asarray(y_true)
    if arr.dtype.kind in "iu":
        return arr.astype(int)
    unknown = sorted({str(v) for v in arr} - set(classes))
    if unknown:
        raise DataError(f"labels {unknown[:5]} are not among the classes {classes}")
    lookup = {name: k for k, name in enumerate(classes)}
    return np.array([lookup[str(v)] for v in arr], dtype=int)


def add_roc_curve(ax: Axes, truth: np.ndarray, score: np.ndarray, label: str) -> bool:
    """Draw one ROC curve with its AUC in the legend label; False (nothing drawn) when undefined."""
    truth = np.asarray(truth, dtype=bool)
    if truth.all() or not truth.any():
        return False
    fpr, tpr, _ = roc_curve(truth, score)
    ax.plot(fpr, tpr, label=f"{label} (AUC = {roc_auc_score(truth, score):.3f})")
    return True


def roc_axes(ax: Axes, title: str = "ROC") -> None:
    """Chance diagonal, labels and limits shared by every ROC plot."""
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(title)
    ax.set_aspect("equal")


def plot_roc(y_true: Sequence[Any] | np.ndarray, y_prob: np.ndarray, classes: list[str]) -> Figure:
    """Binary: one ROC curve for ``classes[1]``; multiclass: one-vs-rest per class. Classes absent from
    ``y_true`` (or making up all of it) are skipped."""
    truth = as_indices(y_true, classes)
    prob = np.asarray(y_prob, dtype=float)
    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.subplots()
    roc_axes(ax, "ROC" if len(classes) == 2 else "ROC (one-vs-rest)")
    targets = [1] if len(classes) == 2 else range(len(classes))
    drawn = [add_roc_curve(ax, truth == k, prob[:, k], classes[k]) for k in targets]
    if any(drawn):
        ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "ROC undefined:\nonly one class in the labels", ha="center", va="center")
    return fig


def plot_reliability(y_true: Sequence[Any] | np.ndarray, before: np.ndarray, after: np.ndarray | None,
                     classes: list[str], n_bins: int = 15) -> Figure:
    """Reliability diagram: accuracy against top-label confidence per equal-width bin, before and (when
    given) after temperature scaling, in one figure; the legend carries each curve's ECE."""
    truth = as_indices(y_true, classes)
    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfectly calibrated")
    curves = [("before", before, "tab:red")] + ([("after temperature scaling", after, "tab:green")]
                                                  if after is not None else [])
    width = 1.0 / n_bins
    for i, (label, prob, colour) in enumerate(curves):
        count, conf, acc = reliability_bins(truth, np.asarray(prob, dtype=float), n_bins)
        full = count > 0
        ece = expected_calibration_error(truth, prob, n_bins)
        centres = (np.arange(n_bins) + 0.5) * width
        # side-by-side bars of the accuracy per bin, and the (confidence, accuracy) points joined
        ax.bar(centres[full] + (i - (len(curves) - 1) / 2) * width / len(curves), acc[full],
               width=width / len(curves), color=colour, alpha=0.25, linewidth=0)
        ax.plot(conf[full], acc[full], marker="o", color=colour, label=f"{label} (ECE {ece:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("confidence (top-label probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability ({n_bins} bins)")
    ax.set_aspect("equal")
    ax.legend(loc="upper left", fontsize=8)
    return fig


def plot_risk_coverage(curves: dict[str, tuple[np.ndarray, np.ndarray]], at: float | None = 0.9) -> Figure:
    """Selective prediction: accuracy on the images answered against coverage (the share answered), one line per
    ordering (``curves``: label -> (coverage, accuracy)); a dotted line marks coverage ``at``."""
    fig = Figure(figsize=(5.5, 4.5), layout="constrained")
    ax = fig.subplots()
    for (label, (cov, acc)), colour in zip(curves.items(), ("tab:blue", "tab:purple", "tab:green")):
        ax.plot(np.asarray(cov) * 100, acc, color=colour, label=label, drawstyle="steps-post")
    full = [float(np.asarray(acc)[-1]) for _, acc in curves.values()][:1]
    if full:
        ax.axhline(full[0], color="grey", linestyle=":", linewidth=1, label=f"all answered ({full[0]:.3f})")
    if at is not None:
        ax.axvline(at * 100, color="grey", linestyle="--", linewidth=1)
    ax.set_xlim(0, 100)
    lowest = min([0.5] + [float(np.min(acc)) for _, acc in curves.values()])
    ax.set_ylim(max(0.0, lowest - 0.02), 1.02)
    ax.set_xlabel("coverage: % of test images answered (least trusted held back)")
    ax.set_ylabel("accuracy on the answered images")
    ax.set_title("Selective prediction (risk-coverage)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as an image (format from the suffix), atomically, creating the parent folder."""
    out = Path(path)
    buf = BytesIO()
    fig.savefig(buf, format=out.suffix.lstrip(".").lower() or "png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(out, buf.getvalue())  # a reader never sees half an image
    return out
