"""Turn a finished run directory into metrics.json, plots, report.md and a self-contained report.html.

The run report is ``SECTIONS``: each a Markdown template under ``evaluate/templates/`` and the function that
builds its context from the run (``ReportInputs``); ``evaluate.render`` turns them into both files."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from oncotransfer.yaml_io import read_run_yaml

from oncotransfer.data.overlap import overlap_line
from oncotransfer.errors import CheckpointError, DataError
from oncotransfer.evaluate.metrics import classification_metrics, fold_summary
from oncotransfer.evaluate.calibration import ece_bootstrap_ci, expected_calibration_error
from oncotransfer.evaluate.selective import accuracy_at_coverage, answered
from oncotransfer.evaluate.trust import calibration_summary, prediction_arrays, selective_block, temperature_text
from oncotransfer.evaluate.slides import attach_slides, slide_metrics
from oncotransfer.evaluate.plots import (plot_confusion, plot_history, plot_reliability, plot_risk_coverage,
                                         plot_roc, save_figure)
from oncotransfer.evaluate.render import fmt, fmt_ci, fmt_mean_sd, slug, write_report
from oncotransfer.evaluate.ood import ood_lines, ood_summary
from oncotransfer.io import read_csv
from oncotransfer.runtables import read_predictions
from oncotransfer.rundir import mark_unfinished, read_ood_meta, read_run_info, write_metrics


def protocol_lines(protocol: dict[str, Any], n_folds: int) -> list[dict[str, str]]:
    """The protocol box: one line per fact, flagged 'danger' or 'warn' where it inflates the numbers."""
    split = protocol.get("split", "unknown")
    lines = [{"text": f"Split: {split}, {n_folds} fold{'s' if n_folds != 1 else ''} evaluated", "level": ""}]
    grouped = protocol.get("grouped_by")
    if protocol.get("image_level") and grouped == "duplicates":
        # no patient ids to group by (public sets such as BUSI publish none): say what the grouping does
        lines.append({"text": "No patient ids in the data: grouped by near-duplicate images (pHash), so no image "
                              "and no near-copy of it is on both sides, but two different images of one patient "
                              "may be", "level": "warn"})
    elif protocol.get("image_level"):
        lines.append({"text": "IMAGE-LEVEL split: patients can be on both sides: accuracy is inflated; "
                              "use group_by_patient", "level": "danger"})
    elif grouped == "patient":
        lines.append({"text": "Grouped by patient: no patient is on both sides of a split", "level": ""})
    elif grouped == "duplicates":
        lines.append({"text": "Grouped by identical images only (no patient IDs): images of one patient "
                              "may still be on both sides", "level": "warn"})
    else:
        lines.append({"text": f"Grouping: {grouped or 'not recorded'}", "level": "warn"})
    sel = protocol.get("selection_on_test")
    if sel:
        lines.append({"text": "Best epoch selected on the test set: optimistic, as in the published study",
                      "level": "warn"})
    elif sel is False and grouped == "patient" and not protocol.get("image_level"):
        lines.append({"text": "Best epoch selected on an inner patient-level validation split (validation patients "
                              "held out of training); the test set was not used for selection", "level": ""})
    elif sel is False:
        lines.append({"text": "Best epoch selected on validation data; the test set was not used for selection",
                      "level": ""})
    lines.append({"text": f"Augmentation: {protocol.get('augment', 'not recorded')}"
                          + (f" (zoom {protocol['zoom_mode']})" if protocol.get("zoom_mode") else ""), "level": ""})
    if protocol.get("recipes"):  # experiments.recipe_merge: the model averages several recipes
        lines.append({"text": f"Model: {protocol['recipes']}", "level": ""})
    return lines


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "not recorded"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    h, rem = divmod(int(round(s)), 3600)
    return (f"{h} h " if h else "") + f"{rem // 60} min {rem % 60:02d} s"


def _read_run(run: Path, need_predictions: bool) -> tuple[dict[str, Any], dict[str, Any], str]:
    missing = [f for f in ("run.json", "predictions.csv" if need_predictions else None)
               if f and not (run / f).is_file()]
    if missing:
        raise CheckpointError(f"{run}: no {' or '.join(missing)}; this is not a finished run, "
                              "train first (oncotransfer train CONFIG) and evaluate its run directory")
    info = read_run_info(run).content()
    cfg, cfg_text = read_run_yaml(run / "config.yaml")
    return info, cfg, cfg_text


def schedule_line(train: dict[str, Any], frozen: bool = False) -> str:
    """One line for train.schedule and the keys that go with it (absent keys: the defaults, constant lr).
    A frozen backbone trains nothing, so its lr multiplier is left out."""
    if not train:
        return "not recorded"
    kind, lr, warm = train.get("schedule", "constant"), train.get("lr", 1e-3), train.get("warmup_epochs", 0)
    ramp = f", linear warm-up over {warm:g} epoch(s)" if warm else ""
    if kind == "cosine":
        text = f"cosine from lr {lr:g} to {train.get('min_lr_ratio', 0.0):g} × lr at the last batch{ramp}"
    elif kind == "onecycle":
        text = (f"one-cycle: from lr / 25 rising linearly to lr {lr:g} over {warm:g} epoch(s), "
                "then cosine to lr / 2.5e5")
    elif kind == "plateau":
        text = (f"reduce-on-plateau: lr {lr:g} × {train.get('plateau_factor', 0.5):g} once more than "
                f"{train.get('plateau_patience', 3)} epoch(s) in a row fail to lower the validation loss")
    else:
        text = f"constant lr {lr:g}"
    if train.get("backbone_lr_mult", 1.0) != 1.0 and not frozen:
        text += f"; backbone lr × {train['backbone_lr_mult']:g}"
    if train.get("label_smoothing", 0.0):
        text += f"; label smoothing {train['label_smoothing']:g}"
    return text


@dataclass(frozen=True)
class ReportInputs:
    """What every section's context function sees: one evaluated run."""
    metrics: dict[str, Any]
    info: dict[str, Any]
    cfg: dict[str, Any]
    cfg_text: str
    figures: list[tuple[str, Path]]
    run: Path

    @property
    def n_folds(self) -> int:
        return len(self.metrics["per_fold"])


def protocol_section(r: ReportInputs) -> dict[str, Any]:
    lines = protocol_lines(r.metrics["protocol"], r.n_folds)
    if r.metrics.get("scored_by"):
        lines.insert(0, {"text": f"Scored by: {r.metrics['scored_by']}", "level": ""})
    cal = r.metrics.get("calibration")
    if r.metrics.get("overlap"):
        ov = r.metrics["overlap"]
        lines.insert(1, {"text": overlap_line(ov), "level": "warn" if ov["overlapping"] or ov["notes"] else ""})
        lines[2:2] = [{"text": note, "level": "warn"} for note in ov["notes"]]
    if r.metrics.get("shift"):
        sh = r.metrics["shift"]
        lines.insert(1, {"text": sh["line"] + (f" (reference: {sh['reference'].get('images')} images, "
                                               f"{sh['reference'].get('which')})" if sh.get("reference") else ""),
                         "level": "warn" if sh.get("shifted") else ""})
    if r.metrics.get("ood") and r.metrics["ood"].get("flagged") is not None and r.metrics.get("scored_by"):
        o = r.metrics["ood"]
        lines.insert(1, {"text": f"Out of distribution: {o['flagged']} of {o['scored']} images "
                                 f"({o['flagged_share']:.1%}) flagged by the run's detector",
                         "level": "warn" if o["flagged_share"] > 0.1 else ""})
    if cal and cal["ece_after"] is not None:
        n = f", {cal['n_val_total']} images" if cal.get("n_val_total") else ""
        asked = cal.get("requested")
        rule = (f" (evaluate.calibration {cal['rule']})" if asked == "auto" and cal.get("rule")
                else f" (evaluate.calibration: {asked})" if asked else "")
        lines.append({"text": f"Temperature scaling fitted on the {cal['fitted_on']}{n}; test folds never used{rule}",
                      "level": "warn" if cal.get("at_bound") else ""})
    elif cal:
        lines.append({"text": f"Probabilities {cal.get('note', 'not calibrated')}", "level": "warn"})
    return {"lines": lines}


def headline_section(r: ReportInputs) -> dict[str, Any]:
    pooled, folds = r.metrics["pooled"], r.metrics["folds"]
    items = [("Accuracy", fmt_ci(pooled["accuracy"], pooled["accuracy_ci95"]) + f" on {pooled['n']} test images"),
             ("Balanced accuracy", fmt(pooled["balanced_accuracy"])),
             ("ROC-AUC", fmt(pooled["roc_auc"]))]
    sl = r.metrics.get("slides")
    if sl:
        items += [(f"Slide-level accuracy ({sl['rule']})",
                   fmt_ci(sl["pooled"]["accuracy"], sl["pooled"]["accuracy_ci95"]) + f" on {sl['slides']} slides"),
                  ("Slide-level balanced accuracy / ROC-AUC",
                   f"{fmt(sl['pooled']['balanced_accuracy'])} / {fmt(sl['pooled']['roc_auc'])}")]
    cal = r.metrics.get("calibration")
    if cal:
        before = fmt_ci(cal["ece_before"], cal.get("ece_before_ci95"))
        after = (f"{before} before, {fmt_ci(cal['ece_after'], cal.get('ece_after_ci95'))} after temperature "
                 f"scaling ({temperature_text(cal)})" if cal["ece_after"] is not None
                 else f"{before} ({cal.get('note', 'not calibrated')})")
        items.append((f"Calibration error (ECE, {cal.get('bins', 15)} bins)", after))
    sel = r.metrics.get("selective")
    if sel:
        items.append(("Accuracy at 90% coverage", fmt_ci(sel["accuracy_at_90_coverage"], sel.get(
            "accuracy_at_90_coverage_ci95")) + f" on the {answered(0.9, sel['n'])} of {sel['n']} test images the "
            f"model is most sure of ({sel['confidence']}); {fmt(sel['accuracy_by_confidence'][-1])} on all"))
    if r.n_folds > 1:
        items += [(f"{label} over folds (mean ± sd)", fmt_mean_sd(folds.get(key)))
                  for key, label in (("accuracy", "Accuracy"), ("balanced_accuracy", "Balanced accuracy"),
                                     ("roc_auc", "ROC-AUC"))]
    return {"items": items}


def ood_section(r: ReportInputs) -> dict[str, Any] | None:
    lines = ood_lines(r.metrics.get("ood"), external=bool(r.metrics.get("scored_by")))
    return {"lines": lines} if lines else None


def per_class_section(r: ReportInputs) -> dict[str, Any]:
    return {"rows": [[c, fmt(v["precision"]), fmt(v["recall"]), fmt(v["f1"]), v["support"]]
                     for c, v in r.metrics["pooled"]["per_class"].items()]}


def binary_section(r: ReportInputs) -> dict[str, Any] | None:
    b = r.metrics["pooled"]["binary"]
    if not b:
        return None
    (tn, fp), (fn, tp) = b["confusion_matrix"]
    return {"positives": " + ".join(b["positive_classes"]),
            "rows": [("precision", fmt(b["precision"])), ("recall (sensitivity)", fmt(b["recall"])),
                     ("specificity", fmt(b["specificity"])), ("F1", fmt(b["f1"])),
                     ("accuracy", fmt(b["accuracy"])), ("TP / FP / TN / FN", f"{tp} / {fp} / {tn} / {fn}")]}


def confusion_section(r: ReportInputs) -> dict[str, Any]:
    classes = r.metrics["classes"]
    return {"classes": classes, "rows": [[c, *counts] for c, counts in
                                         zip(classes, r.metrics["pooled"]["confusion_matrix"])]}


def selective_section(r: ReportInputs) -> dict[str, Any] | None:
    sel = r.metrics.get("selective")
    if not sel:
        return None
    by_ood = sel.get("accuracy_by_ood")
    rows = [[f"{c:.0%}", answered(c, sel["n"]), fmt(a)] + ([fmt(by_ood[i])] if by_ood else [])
            for i, (c, a) in enumerate(zip(sel["coverage"], sel["accuracy_by_confidence"]))
            if round(c * 100) in (100, 90, 80, 70, 50)][::-1]
    return {"confidence": sel["confidence"], "ood": by_ood is not None, "rows": rows}


def plots_section(r: ReportInputs) -> dict[str, Any]:
    return {"plots": [{"title": t, "file": p.relative_to(r.run).as_posix()} for t, p in r.figures]}


def warnings_section(r: ReportInputs) -> dict[str, Any]:
    return {"warnings": [str(w) for w in r.info.get("warnings") or []]}


def setup_section(r: ReportInputs) -> dict[str, Any]:
    model, protocol, info = r.cfg.get("model") or {}, r.metrics["protocol"], r.info
    head = model.get("head")
    return {"items": [
        ("Backbone", model.get("backbone", "not recorded")),
        ("Weights", info.get("weights") or model.get("weights", "not recorded")),
        ("Head", head.get("kind", head) if isinstance(head, dict) else head or "not recorded"),
        ("Freeze", model.get("freeze", "not recorded")),
        ("Precision", info.get("precision", "not recorded")),
        ("Device", info.get("device", "not recorded")),
        ("Augment mode", protocol.get("augment", "not recorded")),
        ("Feature cache", protocol.get("feature_cache", "not recorded")),
        ("LR schedule", schedule_line(r.cfg.get("train") or {}, model.get("freeze") == "frozen")),
        ("Time taken", _duration(info.get("seconds")))]}


def config_section(r: ReportInputs) -> dict[str, Any]:
    return {"config_yaml": r.cfg_text.rstrip() or "(config.yaml not found)"}


# The run report, top to bottom: (template under evaluate/templates/, context function; None leaves it out).
# A new section is one template and one function added here; report.md and report.html both get it.
SECTIONS: list[tuple[str, Callable[[ReportInputs], dict[str, Any] | None]]] = [
    ("run/protocol.md.j2", protocol_section),
    ("run/headline.md.j2", headline_section),
    ("run/ood.md.j2", ood_section),
    ("run/per_class.md.j2", per_class_section),
    ("run/binary.md.j2", binary_section),
    ("run/confusion.md.j2", confusion_section),
    ("run/selective.md.j2", selective_section),
    ("plots.md.j2", plots_section),
    ("run/warnings.md.j2", warnings_section),
    ("run/setup.md.j2", setup_section),
    ("run/config.md.j2", config_section),
]


def _detector(run: Path) -> dict[str, Any] | None:
    """What checkpoint/ood.json says of the run's detector (no tensors), or None."""
    meta = read_ood_meta(run / "checkpoint") if (run / "checkpoint").is_dir() else None
    if meta is None:
        return None
    return {"detector": meta.detector, "params": meta.params, "pass_rate": meta.pass_rate, "features": meta.features,
            "thresholds": {str(m.fold): m.threshold for m in meta.members}, "setting": meta.thresholds}


def _figures(run: Path, metrics: dict[str, Any], info: dict[str, Any], y_true: np.ndarray, y_prob: np.ndarray,
             cal_prob: np.ndarray | None, n_bins: int, sfx: str, ood: np.ndarray | None) -> list[tuple[str, Path]]:
    pooled, classes = metrics["pooled"], metrics["classes"]
    figures: list[tuple[str, Path]] = []
    hist_path = run / "history.csv"
    if hist_path.is_file():
        history = read_csv(hist_path)
        if not history.empty:
            best = {int(k): int(v) for k, v in (info.get("best_epochs") or {}).items()}
            figures.append(("Training history", save_figure(plot_history(history, best), run / "plots/history.png")))
    figures.append(("Confusion matrix", save_figure(plot_confusion(pooled["confusion_matrix"], classes),
                                                  run / f"plots/confusion{sfx}.png")))
    if pooled["binary"]:
        b = pooled["binary"]
        names = ["rest", " + ".join(b["positive_classes"])]
        figures.append(("Binary confusion matrix", save_figure(
            plot_confusion(b["confusion_matrix"], names, "Positive vs rest"), run / f"plots/confusion_binary{sfx}.png")))
    figures.append(("ROC", save_figure(plot_roc(y_true, y_prob, classes), run / f"plots/roc{sfx}.png")))
    figures.append(("Reliability (calibration)", save_figure(
        plot_reliability(y_true, y_prob, cal_prob, classes, n_bins), run / f"plots/reliability{sfx}.png")))
    correct, every = (y_prob.argmax(axis=1) == y_true), np.arange(1, len(y_true) + 1) / len(y_true)
    curves = {f"by {metrics['selective']['confidence']}": (every, accuracy_at_coverage(
        correct, (cal_prob if cal_prob is not None else y_prob).max(axis=1), every))}
    if ood is not None:
        curves["by OOD score (most usual first)"] = (every, accuracy_at_coverage(correct, -ood, every))
    figures.append(("Selective prediction (risk-coverage)", save_figure(
        plot_risk_coverage(curves), run / f"plots/selective{sfx}.png")))
    return figures


def evaluate_run(run_dir: str | Path, predictions: pd.DataFrame | None = None,
                 out_name: str = "report", plots: bool = True, scored_by: str | None = None,
                 slide_aggregate: str = "mean", overlap: dict[str, Any] | None = None,
                 shift: dict[str, Any] | None = None) -> dict[str, Any]:
    """Metrics per fold and pooled, plots and the Markdown/HTML report for one run directory.

    ``predictions`` replaces predictions.csv (e.g. an external test set); with an ``out_name`` other than
    "report" the outputs get that suffix (metrics_<out_name>.json, plots/confusion_<out_name>.png, ...)
    so the run's own results are not overwritten. ``plots=False`` writes metrics only (grids: plots and
    reports cost about 0.7 s a run, more than training a head on cached features). ``scored_by`` names the
    model that produced given predictions (e.g. "ensemble of 5 fold models") in metrics and the protocol.
    ECE comes from ``prob_<class>`` (``pooled.ece``) and, where present, ``cal_prob_<class>`` (``calibration``).
    Tiles of whole slides (a ``slide`` column, or the data manifest's) also get slide-level metrics
    (``slides``): slide label = its tiles' label, slide probabilities = ``slide_aggregate`` of its tiles.
    """
    run = Path(run_dir)
    info, cfg, cfg_text = _read_run(run, need_predictions=predictions is None)
    if predictions is None:
        predictions = read_predictions(run / "predictions.csv", info.get("classes"))
        predictions = attach_slides(predictions, (cfg.get("data") or {}).get("path"))
    if predictions.empty:
        raise DataError(f"{run}: the predictions have no rows; check that the test subset is not empty")
    classes = info.get("classes") or [c[5:] for c in predictions.columns if c.startswith("prob_")]
    if "fold" not in predictions.columns:
        predictions = predictions.assign(fold=0)
    ev = cfg.get("evaluate") or {}
    kw = {"classes": classes, "positive_classes": ev.get("positive_classes"),
          "bootstrap": int(ev.get("bootstrap", 1000))}
    per_fold = {str(f): classification_metrics(*prediction_arrays(part, classes), **kw)
                for f, part in predictions.groupby("fold", sort=True)}
    y_true, y_prob = prediction_arrays(predictions, classes)
    pooled = classification_metrics(y_true, y_prob, **kw)
    n_bins = int(ev.get("ece_bins", 15))
    pooled["ece"] = expected_calibration_error(y_true, y_prob, n_bins)
    pooled["ece_ci95"] = ece_bootstrap_ci(y_true, y_prob, n_bins, kw["bootstrap"])
    for f, part in predictions.groupby("fold", sort=True):
        per_fold[str(f)]["ece"] = expected_calibration_error(*prediction_arrays(part, classes), n_bins)
    calibration, cal_prob = calibration_summary(predictions, classes, info, n_bins, kw["bootstrap"])
    keys = ("accuracy", "balanced_accuracy", "roc_auc") + (("binary.precision", "binary.recall")
                                                          if pooled["binary"] else ())
    metrics = {"name": info.get("name") or cfg.get("name") or run.name, "classes": classes,
               "protocol": info.get("protocol") or {}, "pooled": pooled, "per_fold": per_fold,
               "folds": fold_summary(list(per_fold.values()), keys), "calibration": calibration,
               "selective": selective_block(predictions, y_true, y_prob, cal_prob, kw["bootstrap"])}
    ood = ood_summary(predictions, _detector(run))
    if ood is not None:
        metrics["ood"] = ood
    if scored_by:
        metrics["scored_by"] = scored_by
    if overlap is not None:  # external data vs the run's training images (evaluate.external)
        metrics["overlap"] = overlap
    if shift is not None:  # a two-sample test of the external images against the training features
        metrics["shift"] = shift
    sfx = "" if out_name == "report" else f"_{slug(out_name)}"
    slides = slide_metrics(predictions, classes, slide_aggregate, kw["positive_classes"], kw["bootstrap"],
                           run / f"slide_predictions{sfx}.csv")
    if slides:
        metrics["slides"] = slides
    # The metrics file goes last (rundir.run_finished): a kill or a full disk part-way leaves none.
    mark_unfinished(run, sfx[1:])
    if plots:
        ood = predictions["ood_score"].to_numpy(float) if "ood_score" in predictions.columns else None
        figures = _figures(run, metrics, info, y_true, y_prob, cal_prob, n_bins, sfx, ood)
        inputs = ReportInputs(metrics, info, cfg, cfg_text, figures, run)
        write_report(run, out_name, f"Evaluation report: {metrics['name']}",
                     [(template, context(inputs)) for template, context in SECTIONS])
    return write_metrics(run, metrics, report=plots, suffix=sfx[1:])
