"""Turn a finished run directory into metrics.json, plots, report.md and a self-contained report.html."""
from __future__ import annotations

import base64
import math
import re
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd
import yaml

from oncotransfer.errors import CheckpointError, DataError
from oncotransfer.evaluate.metrics import classification_metrics, fold_summary
from oncotransfer.evaluate.calibration import expected_calibration_error
from oncotransfer.evaluate.plots import (as_indices, plot_confusion, plot_history, plot_reliability, plot_roc,
                                         save_figure)
from oncotransfer.io import atomic_write_text
from oncotransfer.rundir import mark_unfinished, read_run_info, write_metrics

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:960px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #ddd;padding-bottom:.3em} h2{margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0} th,td{border:1px solid #ccc;padding:.3em .7em;text-align:right}
th:first-child,td:first-child{text-align:left} th{background:#f4f4f4}
.protocol{border:2px solid #446;border-radius:6px;padding:.6em 1.2em;background:#f7f8fc}
.protocol li{margin:.25em 0} .danger{color:#b00;font-weight:bold} .warn{color:#a60}
.headline{font-size:1.25em} img{max-width:100%;display:block;margin:.8em 0}
pre{background:#f4f4f4;padding:.8em;overflow-x:auto;font-size:.85em}
"""

_MD = """# Evaluation report: {{ name }}

## Protocol
{% for p in protocol %}
> - {{ ('**⚠ ' ~ p.text ~ '**') if p.level == 'danger' else (('*⚠ ' ~ p.text ~ '*') if p.level == 'warn' else p.text) }}
{% endfor %}

## Headline
{% for label, value in headline %}
- **{{ label }}**: {{ value }}
{% endfor %}

## Per-class scores

| class | precision | recall | F1 | support |
|---|---|---|---|---|
{% for r in per_class %}
| {{ r|join(' | ') }} |
{% endfor %}
{% if binary %}

## Binary view: {{ binary.positives }} vs rest

| metric | value |
|---|---|
{% for label, value in binary.rows %}
| {{ label }} | {{ value }} |
{% endfor %}
{% endif %}

## Confusion matrix (rows = true, columns = predicted)

| true \\ predicted | {{ confusion.classes|join(' | ') }} |
|---|{% for c in confusion.classes %}---|{% endfor %}

{% for name, counts in confusion.rows %}
| {{ name }} | {{ counts|join(' | ') }} |
{% endfor %}

## Plots
{% for p in plots %}

### {{ p.title }}

![{{ p.title }}]({{ p.file }})
{% endfor %}

## Warnings
{% for w in warnings %}
- {{ w }}
{% else %}
- none
{% endfor %}

## Set-up
{% for label, value in setup %}
- **{{ label }}**: {{ value }}
{% endfor %}

## Config

```yaml
{{ config_yaml }}
```
"""

_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Evaluation report: {{ name }}</title>
<style>{{ css|safe }}</style></head><body>
<h1>Evaluation report: {{ name }}</h1>
<div class="protocol"><h2>Protocol</h2><ul>
{% for p in protocol %}<li class="{{ p.level }}">{% if p.level %}⚠ {% endif %}{{ p.text }}</li>
{% endfor %}</ul></div>
<h2>Headline</h2><ul class="headline">
{% for label, value in headline %}<li><b>{{ label }}</b>: {{ value }}</li>
{% endfor %}</ul>
<h2>Per-class scores</h2>
<table><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>
{% for r in per_class %}<tr>{% for v in r %}<td>{{ v }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% if binary %}<h2>Binary view: {{ binary.positives }} vs rest</h2>
<table><tr><th>metric</th><th>value</th></tr>
{% for label, value in binary.rows %}<tr><td>{{ label }}</td><td>{{ value }}</td></tr>
{% endfor %}</table>{% endif %}
<h2>Confusion matrix (rows = true, columns = predicted)</h2>
<table><tr><th>true \\ predicted</th>{% for c in confusion.classes %}<th>{{ c }}</th>{% endfor %}</tr>
{% for name, counts in confusion.rows %}<tr><td>{{ name }}</td>{% for v in counts %}<td>{{ v }}</td>{% endfor %}</tr>
{% endfor %}</table>
<h2>Plots</h2>
{% for p in plots %}<h3>{{ p.title }}</h3><img alt="{{ p.title }}" src="{{ p.uri }}">
{% endfor %}
<h2>Warnings</h2><ul>
{% for w in warnings %}<li>{{ w }}</li>{% else %}<li>none</li>{% endfor %}</ul>
<h2>Set-up</h2><ul>
{% for label, value in setup %}<li><b>{{ label }}</b>: {{ value }}</li>
{% endfor %}</ul>
<h2>Config</h2><pre>{{ config_yaml }}</pre>
</body></html>
"""


def render(template: str, html: bool, **context: Any) -> str:
    """Render a template string; HTML output is autoescaped, Markdown is not."""
    env = jinja2.Environment(autoescape=html, trim_blocks=True, lstrip_blocks=True,
                             keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    return env.from_string(template).render(css=CSS, **context)


def fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def fmt_ci(value: float | None, ci: list[float] | None) -> str:
    return fmt(value) + (f" (95% CI {fmt(ci[0])}–{fmt(ci[1])})" if ci else "")


def fmt_mean_sd(summary: dict[str, Any] | None) -> str:
    if not summary:
        return "n/a"
    return f"{fmt(summary['mean'])} ± {fmt(summary['sd'])} (n = {summary['n']})"


def data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "run"


def prediction_arrays(predictions: pd.DataFrame, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``(y_true, y_prob)`` from a predictions frame with ``label`` (class names) and ``prob_<class>`` columns."""
    cols = [f"prob_{c}" for c in classes]
    missing = [c for c in ["label", *cols] if c not in predictions.columns]
    if missing:
        raise DataError(f"predictions: missing column(s) {missing}; expected 'label' and one prob_<class> "
                        f"column for each of {classes}")
    return as_indices(predictions["label"].astype(str).to_numpy(), classes), predictions[cols].to_numpy(float)


def calibration_summary(predictions: pd.DataFrame, classes: list[str], info: dict[str, Any], n_bins: int
                        ) -> tuple[dict[str, Any], np.ndarray | None]:
    """metrics.json's "calibration" block and the pooled calibrated probabilities (None when there are none).

    ``cal_prob_<class>`` columns exist for the folds that have a temperature; rows of any fold without one
    keep their uncalibrated probabilities in ``ece_after`` (said in the note)."""
    y_true, y_prob = prediction_arrays(predictions, classes)
    cols = [f"cal_prob_{c}" for c in classes]
    cal = None
    if all(c in predictions.columns for c in cols) and predictions[cols].notna().all(axis=1).any():
        cal = predictions[cols].to_numpy(float)
        missing = np.isnan(cal).any(axis=1)
        cal[missing] = y_prob[missing]
    temps = info.get("temperatures") or {}
    out = {"ece_before": expected_calibration_error(y_true, y_prob, n_bins),
           "ece_after": expected_calibration_error(y_true, cal, n_bins) if cal is not None else None,
           "temperatures": temps, "fitted_on": "validation subset of each fold", "bins": n_bins}
    if cal is None:
        enabled = (info.get("calibration") or {}).get("enabled", True)
        out["note"] = ("not calibrated: no validation split" if enabled
                       else "not calibrated: evaluate.calibrate is false")
    elif missing.any():
        folds = sorted(map(str, predictions.loc[missing, "fold"].unique()))
        out["note"] = f"fold(s) {', '.join(folds)} not calibrated (no validation subset); uncalibrated there"
    return out, cal


def _temperature_text(temps: dict[str, Any]) -> str:
    vals = [float(t) for t in temps.values() if t is not None]
    if not vals:
        return ""
    if len(vals) == 1:
        return f"T = {vals[0]:.3f}"
    return f"T = {min(vals):.3f}–{max(vals):.3f} over {len(vals)} folds"


def protocol_lines(protocol: dict[str, Any], n_folds: int) -> list[dict[str, str]]:
    """The protocol box: one line per fact, flagged 'danger' or 'warn' where it inflates the numbers."""
    split = protocol.get("split", "unknown")
    lines = [{"text": f"Split: {split}, {n_folds} fold{'s' if n_folds != 1 else ''} evaluated", "level": ""}]
    grouped = protocol.get("grouped_by")
    if protocol.get("image_level"):
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
    elif sel is False:
        lines.append({"text": "Best epoch selected on validation data; the test set was not used for selection",
                      "level": ""})
    lines.append({"text": f"Augmentation: {protocol.get('augment', 'not recorded')}"
                          + (f" (zoom {protocol['zoom_mode']})" if protocol.get("zoom_mode") else ""), "level": ""})
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
    cfg_path = run / "config.yaml"
    cfg_text = cfg_path.read_text() if cfg_path.is_file() else ""
    cfg = yaml.safe_load(cfg_text) if cfg_text else {}
    return info, cfg if isinstance(cfg, dict) else {}, cfg_text


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


def _context(metrics: dict[str, Any], info: dict[str, Any], cfg: dict[str, Any], cfg_text: str,
             plots: list[tuple[str, Path]], run: Path) -> dict[str, Any]:
    pooled, folds, classes = metrics["pooled"], metrics["folds"], metrics["classes"]
    n_folds = len(metrics["per_fold"])
    headline = [("Accuracy", fmt_ci(pooled["accuracy"], pooled["accuracy_ci95"]) + f" on {pooled['n']} test images"),
                ("Balanced accuracy", fmt(pooled["balanced_accuracy"])),
                ("ROC-AUC", fmt(pooled["roc_auc"]))]
    cal = metrics.get("calibration")
    if cal:
        t = _temperature_text(cal.get("temperatures") or {})
        after = (f"{fmt(cal['ece_before'])} before, {fmt(cal['ece_after'])} after temperature scaling"
                 f" ({t}, fitted on the {cal['fitted_on']})" if cal["ece_after"] is not None
                 else f"{fmt(cal['ece_before'])} ({cal.get('note', 'not calibrated')})")
        headline.append((f"Calibration error (ECE, {cal.get('bins', 15)} bins)", after))
    if n_folds > 1:
        headline += [(f"{label} over folds (mean ± sd)", fmt_mean_sd(folds.get(key)))
                     for key, label in (("accuracy", "Accuracy"), ("balanced_accuracy", "Balanced accuracy"),
                                        ("roc_auc", "ROC-AUC"))]
    binary = None
    if pooled["binary"]:
        b = pooled["binary"]
        (tn, fp), (fn, tp) = b["confusion_matrix"]
        binary = {"positives": " + ".join(b["positive_classes"]),
                  "rows": [("precision", fmt(b["precision"])), ("recall (sensitivity)", fmt(b["recall"])),
                           ("specificity", fmt(b["specificity"])), ("F1", fmt(b["f1"])),
                           ("accuracy", fmt(b["accuracy"])), ("TP / FP / TN / FN", f"{tp} / {fp} / {tn} / {fn}")]}
    model, protocol = cfg.get("model") or {}, metrics["protocol"]
    head = model.get("head")
    setup = [("Backbone", model.get("backbone", "not recorded")),
             ("Weights", info.get("weights") or model.get("weights", "not recorded")),
             ("Head", head.get("kind", head) if isinstance(head, dict) else head or "not recorded"),
             ("Freeze", model.get("freeze", "not recorded")),
             ("Precision", info.get("precision", "not recorded")),
             ("Device", info.get("device", "not recorded")),
             ("Augment mode", protocol.get("augment", "not recorded")),
             ("Feature cache", protocol.get("feature_cache", "not recorded")),
             ("LR schedule", schedule_line(cfg.get("train") or {}, model.get("freeze") == "frozen")),
             ("Time taken", _duration(info.get("seconds")))]
    lines = protocol_lines(protocol, n_folds)
    if metrics.get("scored_by"):
        lines.insert(0, {"text": f"Scored by: {metrics['scored_by']}", "level": ""})
    if cal:
        lines.append({"text": "Temperature scaling fitted on the validation subset of each fold; test folds "
                              "never used" if cal["ece_after"] is not None else
                      f"Probabilities {cal.get('note', 'not calibrated')}",
                      "level": "" if cal["ece_after"] is not None else "warn"})
    return {
        "name": metrics["name"],
        "protocol": lines,
        "headline": headline,
        "per_class": [[c, fmt(v["precision"]), fmt(v["recall"]), fmt(v["f1"]), v["support"]]
                      for c, v in pooled["per_class"].items()],
        "binary": binary,
        "confusion": {"classes": classes, "rows": list(zip(classes, pooled["confusion_matrix"]))},
        "plots": [{"title": t, "file": p.relative_to(run).as_posix(), "uri": data_uri(p)} for t, p in plots],
        "warnings": [str(w) for w in info.get("warnings") or []],
        "setup": setup,
        "config_yaml": cfg_text.rstrip() or "(config.yaml not found)",
    }


def evaluate_run(run_dir: str | Path, predictions: pd.DataFrame | None = None,
                 out_name: str = "report", plots: bool = True, scored_by: str | None = None) -> dict[str, Any]:
    """Metrics per fold and pooled, plots and the Markdown/HTML report for one run directory.

    ``predictions`` replaces predictions.csv (e.g. an external test set); with an ``out_name`` other than
    "report" the outputs get that suffix (metrics_<out_name>.json, plots/confusion_<out_name>.png, ...)
    so the run's own results are not overwritten. ``plots=False`` writes metrics only (grids: plots and
    reports cost about 0.7 s a run, more than training a head on cached features). ``scored_by`` names the
    model that produced given predictions (e.g. "ensemble of 5 fold models") in metrics and the protocol.
    ECE comes from ``prob_<class>`` (``pooled.ece``) and, where present, ``cal_prob_<class>`` (``calibration``).
    """
    run = Path(run_dir)
    info, cfg, cfg_text = _read_run(run, need_predictions=predictions is None)
    if predictions is None:
        predictions = pd.read_csv(run / "predictions.csv", dtype={"label": str, "pred": str, "path": str})
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
    for f, part in predictions.groupby("fold", sort=True):
        per_fold[str(f)]["ece"] = expected_calibration_error(*prediction_arrays(part, classes), n_bins)
    calibration, cal_prob = calibration_summary(predictions, classes, info, n_bins)
    keys = ("accuracy", "balanced_accuracy", "roc_auc") + (("binary.precision", "binary.recall")
                                                          if pooled["binary"] else ())
    metrics = {"name": info.get("name") or cfg.get("name") or run.name, "classes": classes,
               "protocol": info.get("protocol") or {}, "pooled": pooled, "per_fold": per_fold,
               "folds": fold_summary(list(per_fold.values()), keys), "calibration": calibration}
    if scored_by:
        metrics["scored_by"] = scored_by
    sfx = "" if out_name == "report" else f"_{slug(out_name)}"
    # The metrics file goes last (rundir.run_finished): a kill or a full disk part-way leaves none.
    mark_unfinished(run, sfx[1:])
    if not plots:
        return write_metrics(run, metrics, report=False, suffix=sfx[1:])

    figures: list[tuple[str, Path]] = []
    hist_path = run / "history.csv"
    if hist_path.is_file():
        history = pd.read_csv(hist_path)
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

    ctx = _context(metrics, info, cfg, cfg_text, figures, run)
    atomic_write_text(run / f"{out_name}.md", render(_MD, html=False, **ctx))
    atomic_write_text(run / f"{out_name}.html", render(_HTML, html=True, **ctx))
    return write_metrics(run, metrics, report=True, suffix=sfx[1:])


def write_comparison(run_dir: str | Path, sections: list[tuple[str, dict[str, Any], pd.DataFrame]]) -> Path:
    """Side-by-side report of several evaluated runs (see ``oncotransfer.evaluate.compare``)."""
    from oncotransfer.evaluate.compare import write_comparison as _write  # lazy: compare imports this module
    return _write(run_dir, sections)
