"""Grid results: a tidy table (one row per run), per-cell summaries, a Figure-3 plot, a Table-1 table, a report."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from oncotransfer.data.augment import describe
from oncotransfer.evaluate.metrics import summarise
from oncotransfer.evaluate.plots import save_figure
from oncotransfer.evaluate.render import frame_table, write_report
from oncotransfer.io import atomic_to_csv, atomic_write_bytes, read_csv
from oncotransfer.rundir import read_metrics, read_run_info, run_finished

_METRICS = ("accuracy", "balanced_accuracy", "roc_auc")


def _label(key: str, value: Any, cfg) -> Any:
    """Grid values as table cells: scalars as they are, an augment section as its one-line description."""
    if key == "augment":
        return describe(cfg.augment)
    if key == "recipe":
        return value["name"]
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return value


def collect(grid_dir: Path, runs: list) -> pd.DataFrame:
    """One row per finished run: the varied keys, trial, metrics, best epoch(s), seconds and run directory."""
    rows = []
    for run in runs:
        d = grid_dir / "runs" / run.run_id
        if not run_finished(d):
            continue
        m = read_metrics(d).content()
        info = read_run_info(d).content()
        row = {"cell": run.cell, **{k: _label(k, v, run.cfg) for k, v in run.values.items()}, "trial": run.trial}
        row.update({k: m["pooled"].get(k) for k in _METRICS})
        ci = m["pooled"].get("accuracy_ci95") or [None, None]
        cal = m.get("calibration") or {}
        row.update({"accuracy_ci95_low": ci[0], "accuracy_ci95_high": ci[1],
                    "ece_before": cal.get("ece_before", m["pooled"].get("ece")), "ece_after": cal.get("ece_after")})
        row["best_epochs"] = ";".join(str(v) for v in (info.get("best_epochs") or {}).values())
        row.update({"seconds": info.get("seconds"), "run_dir": str(d)})
        rows.append(row)
    return pd.DataFrame(rows)


def cell_ensemble(run_dirs: list[str]) -> dict[str, Any] | None:
    """Metrics of the trials' averaged test probabilities (``ensemble_accuracy``, ...), or None unless there
    are 2+ trials that all predicted the same test rows (trial keys such as train.seed leave the split alone).
    Calibrated probabilities are averaged when every trial has them, the uncalibrated ones otherwise."""
    from oncotransfer.evaluate.metrics import classification_metrics
    from oncotransfer.evaluate.report import prediction_arrays
    if len(run_dirs) < 2 or not all((Path(d) / "predictions.csv").is_file() for d in run_dirs):
        return None
    from oncotransfer.runtables import read_predictions
    frames = [read_predictions(Path(d) / "predictions.csv") for d in run_dirs]
    rows = frames[0][["fold", "path", "label"]]
    if any(not f[["fold", "path", "label"]].equals(rows) for f in frames[1:]):
        return None
    classes = read_run_info(run_dirs[0]).classes
    cal = [f"cal_prob_{c}" for c in classes]
    calibrated = all(set(cal) <= set(f.columns) and f[cal].notna().all().all() for f in frames)
    probs = [f[cal].to_numpy(float) if calibrated else prediction_arrays(f, classes)[1] for f in frames]
    y_true = prediction_arrays(frames[0], classes)[0]
    m = classification_metrics(y_true, np.mean(probs, axis=0), classes, bootstrap=0)
    return {"ensemble_accuracy": m["accuracy"], "ensemble_balanced_accuracy": m["balanced_accuracy"],
            "ensemble_roc_auc": m["roc_auc"], "ensemble_trials": len(frames),
            "ensemble_probabilities": "calibrated" if calibrated else "uncalibrated"}


def summarise_cells(results: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per cell: mean, sd, 95% CI of accuracy over trials, n (and mean balanced accuracy and ROC-AUC); and,
    where the trials share their test rows, the metrics of their averaged probabilities (``ensemble_*``)."""
    out = []
    for cell, part in results.groupby("cell", sort=True):
        s = summarise(part["accuracy"].astype(float))
        row = {"cell": cell, **{k: part[k].iloc[0] for k in keys}, "accuracy_mean": s["mean"], "accuracy_sd": s["sd"],
               # an accuracy lies in [0, 1]; the t-interval of 2-3 trials can reach past it
               "accuracy_ci95_low": max(0.0, s["ci95"][0]), "accuracy_ci95_high": min(1.0, s["ci95"][1]), "n": s["n"]}
        for k in _METRICS[1:]:
            vals = pd.to_numeric(part[k], errors="coerce")
            row[f"{k}_mean"] = float(vals.mean()) if vals.notna().any() else None
        if "run_dir" in part.columns:
            row.update(cell_ensemble(part.sort_values("trial")["run_dir"].astype(str).tolist()) or {})
        out.append(row)
    return pd.DataFrame(out)


def comparison(results: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One row per cell, the columns a recipe comparison needs: accuracy with its 95% CI (the pooled bootstrap
    interval of one trial, or the t-interval over several), balanced accuracy, ROC-AUC, ECE before and after
    temperature scaling, and minutes of training and evaluation (summed over trials)."""
    rows = []
    for cell, part in results.groupby("cell", sort=True):
        acc = part["accuracy"].astype(float)
        if len(part) == 1:
            low, high = part["accuracy_ci95_low"].iloc[0], part["accuracy_ci95_high"].iloc[0]
        else:
            low, high = summarise(acc)["ci95"]
        ci = "" if low is None or pd.isna(low) else f" ({max(0.0, low):.3f}-{min(1.0, high):.3f})"
        mean = {k: pd.to_numeric(part[k], errors="coerce").mean() for k in
                ("balanced_accuracy", "roc_auc", "ece_before", "ece_after")}
        rows.append({"cell": cell, **{k: part[k].iloc[0] for k in keys}, "trials": len(part),
                     "accuracy (95% CI)": f"{acc.mean():.3f}{ci}",
                     **{k.replace("_", " "): "-" if pd.isna(v) else f"{v:.3f}" for k, v in mean.items()},
                     "minutes": f"{pd.to_numeric(part['seconds'], errors='coerce').sum() / 60:.1f}"})
    return pd.DataFrame(rows)


def figure3(summary: pd.DataFrame, base) -> Figure | None:
    """Accuracy against learning rate (log x), one line per backbone × epochs, error bars = sd over trials."""
    if "train.lr" not in summary.columns:
        return None
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    df = summary.assign(backbone=summary.get("model.backbone", base.model.backbone),
                        epochs=summary.get("train.epochs", base.train.epochs))
    for (bb, ep), part in df.groupby(["backbone", "epochs"], sort=True):
        part = part.groupby("train.lr", as_index=False)[["accuracy_mean", "accuracy_sd"]].mean().sort_values("train.lr")
        ax.errorbar(part["train.lr"], part["accuracy_mean"], yerr=part["accuracy_sd"], marker="o", capsize=3,
                    label=f"{bb}, {ep} epochs")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("test accuracy (mean ± sd over trials)")
    ax.set_title("Accuracy against learning rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def table1(summary: pd.DataFrame, keys: list[str]) -> pd.DataFrame | None:
    """Rows = augmentation settings, columns = the other varied keys, cells = mean ± sd accuracy."""
    aug = [k for k in keys if k == "augment" or k.startswith("augment.")]
    if not aug:
        return None
    other = [k for k in keys if k not in aug]
    df = summary.assign(setting=summary[aug].astype(str).agg(", ".join, axis=1),
                        column=summary[other].astype(str).agg(", ".join, axis=1) if other else "accuracy",
                        value=[f"{m:.3f} ± {s:.3f}" for m, s in zip(summary["accuracy_mean"], summary["accuracy_sd"])])
    table = df.pivot_table(index="setting", columns="column", values="value", aggfunc="first", sort=False)
    return table.reset_index().rename(columns={"setting": "augmentation"})


def _write_table(path: Path, title: str, df: pd.DataFrame, keys: list[str]) -> None:
    atomic_write_bytes(path, (f"# {title}\n\n" + frame_table(df, raw=keys) + "\n").encode())


def write_results(spec, grid_dir: Path, runs: list) -> pd.DataFrame:
    """Write results.csv, summary.csv/.md, comparison.md, figure3.png, table1.md and report.md/.html (one
    source, sections under evaluate/templates/grid/); return the summary."""
    keys = list(spec.grid)
    results = collect(grid_dir, runs)
    atomic_to_csv(results, grid_dir / "results.csv", index=False)
    if results.empty:
        return pd.DataFrame()
    summary = summarise_cells(results, keys)
    atomic_to_csv(summary, grid_dir / "summary.csv", index=False)
    _write_table(grid_dir / "summary.md", f"Grid {spec.name}", summary, keys)
    table = comparison(results, keys)
    _write_table(grid_dir / "comparison.md", f"Grid {spec.name}: comparison", table, keys)
    fig = figure3(summary, spec.base)
    png = save_figure(fig, grid_dir / "figure3.png") if fig is not None else None
    t1 = table1(summary, keys)
    if t1 is not None:
        _write_table(grid_dir / "table1.md", "Accuracy by augmentation setting (mean ± sd over trials)", t1, keys)
    overview = {"n_runs": len(results), "n_cells": results["cell"].nunique(), "trials": spec.trials,
                "trial_keys": ", ".join(spec.trial_keys), "seconds": f"{float(results['seconds'].sum()):.1f} s"}
    write_report(grid_dir, "report", f"Grid {spec.name}", [
        ("grid/overview.md.j2", overview),
        ("grid/comparison.md.j2", {"table": frame_table(table, raw=keys)}),
        ("grid/summary.md.j2", {"table": frame_table(summary, raw=keys)}),
        ("grid/table1.md.j2", {"table": frame_table(t1, raw=keys)} if t1 is not None else None),
        ("grid/figure3.md.j2", {"file": png.relative_to(grid_dir).as_posix()} if png else None),
        ("grid/runs.md.j2", {"table": frame_table(results.drop(columns=["run_dir"]), raw=keys)}),
    ])
    return summary
