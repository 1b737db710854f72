"""Side-by-side comparison of evaluated runs, e.g. multistage vs direct training in the multistage study."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.preprocessing import label_binarize

from oncotransfer.errors import DataError
from oncotransfer.evaluate.plots import add_roc_curve, plot_confusion, roc_axes, save_figure
from oncotransfer.evaluate.report import (
    data_uri, fmt, fmt_ci, fmt_mean_sd, prediction_arrays, protocol_lines, render, slug,
)
from oncotransfer.io import atomic_write_text

_MD = """# Comparison: {{ labels|join(' vs ') }}

| | {{ labels|join(' | ') }} |
|---|{% for l in labels %}---|{% endfor %}

{% for name, values in rows %}
| {{ name }} | {{ values|join(' | ') }} |
{% endfor %}
{% if alerts %}

## Protocol warnings
{% for a in alerts %}
- **⚠ {{ a }}**
{% endfor %}
{% endif %}

## Plots
{% for p in plots %}

### {{ p.title }}

![{{ p.title }}]({{ p.file }})
{% endfor %}
"""

_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Comparison: {{ labels|join(' vs ') }}</title>
<style>{{ css|safe }}</style></head><body>
<h1>Comparison: {{ labels|join(' vs ') }}</h1>
<table><tr><th></th>{% for l in labels %}<th>{{ l }}</th>{% endfor %}</tr>
{% for name, values in rows %}<tr><td>{{ name }}</td>{% for v in values %}<td>{{ v }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% if alerts %}<div class="protocol"><h2>Protocol warnings</h2><ul>
{% for a in alerts %}<li class="danger">⚠ {{ a }}</li>{% endfor %}</ul></div>{% endif %}
<h2>Plots</h2>
{% for p in plots %}<h3>{{ p.title }}</h3><img alt="{{ p.title }}" src="{{ p.uri }}">
{% endfor %}
</body></html>
"""


def _roc_target(y_true: np.ndarray, y_prob: np.ndarray, classes: list[str],
                binary: dict[str, Any] | None) -> tuple[np.ndarray, np.ndarray, str]:
    """One ROC curve per run: positive-vs-rest when the run has a binary view, else micro-averaged OvR."""
    if binary:
        idx = [classes.index(c) for c in binary["positive_classes"]]
        return np.isin(y_true, idx), y_prob[:, idx].sum(axis=1), " + ".join(binary["positive_classes"]) + " vs rest"
    onehot = label_binarize(y_true, classes=list(range(len(classes))))
    return onehot.ravel().astype(bool), y_prob.ravel(), "micro-average one-vs-rest"


def _rows(metrics: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    def binary(m: dict[str, Any], key: str) -> str:
        b = m["pooled"]["binary"]
        return f"{fmt(b[key])} ({' + '.join(b['positive_classes'])})" if b else "n/a"

    def over_folds(m: dict[str, Any], key: str) -> str:
        return fmt_mean_sd(m["folds"].get(key)) if len(m["per_fold"]) > 1 else "single split"

    def protocol(m: dict[str, Any]) -> str:
        lines = protocol_lines(m.get("protocol") or {}, len(m["per_fold"]))
        return "; ".join(line["text"].split(":")[0] if line["level"] else line["text"] for line in lines[:2])

    return [
        ("Classes", [", ".join(m["classes"]) for m in metrics]),
        ("Test images", [str(m["pooled"]["n"]) for m in metrics]),
        ("Accuracy [95% CI]", [fmt_ci(m["pooled"]["accuracy"], m["pooled"]["accuracy_ci95"]) for m in metrics]),
        ("Balanced accuracy", [fmt(m["pooled"]["balanced_accuracy"]) for m in metrics]),
        ("ROC-AUC", [fmt(m["pooled"]["roc_auc"]) for m in metrics]),
        ("Binary precision", [binary(m, "precision") for m in metrics]),
        ("Binary recall", [binary(m, "recall") for m in metrics]),
        ("Accuracy over folds (mean ± sd)", [over_folds(m, "accuracy") for m in metrics]),
        ("Balanced accuracy over folds (mean ± sd)", [over_folds(m, "balanced_accuracy") for m in metrics]),
        ("ROC-AUC over folds (mean ± sd)", [over_folds(m, "roc_auc") for m in metrics]),
        ("Protocol", [protocol(m) for m in metrics]),
    ]


def write_comparison(run_dir: str | Path, sections: list[tuple[str, dict[str, Any], pd.DataFrame]]) -> Path:
    """Write comparison.md and comparison.html (plus plots/roc_compare.png and plots/confusion_<label>.png)
    for ``(label, metrics from evaluate_run, predictions frame)`` sections; returns the HTML path."""
    if not sections:
        raise DataError("write_comparison: no sections given; pass (label, metrics, predictions) for each run")
    run = Path(run_dir)
    labels = [label for label, _, _ in sections]
    if len(set(map(slug, labels))) != len(labels):
        raise DataError(f"write_comparison: labels {labels} are not distinct; give each run its own label")
    fig = Figure(figsize=(5.5, 5), layout="constrained")
    ax = fig.subplots()
    roc_axes(ax, "ROC: " + " vs ".join(labels))
    plots: list[tuple[str, Path]] = []
    drawn = False
    for label, metrics, preds in sections:
        classes = metrics["classes"]
        y_true, y_prob = prediction_arrays(preds, classes)
        truth, score, what = _roc_target(y_true, y_prob, classes, metrics["pooled"]["binary"])
        drawn |= add_roc_curve(ax, truth, score, f"{label}: {what}")
        cm = plot_confusion(metrics["pooled"]["confusion_matrix"], classes, f"{label}: confusion matrix")
        plots.append((f"Confusion matrix: {label}", save_figure(cm, run / f"plots/confusion_{slug(label)}.png")))
    if drawn:
        ax.legend(loc="lower right", fontsize=8)
    plots.insert(0, ("ROC curves", save_figure(fig, run / "plots/roc_compare.png")))

    metrics_list = [m for _, m, _ in sections]
    alerts = [f"{label}: {line['text']}" for label, m, _ in sections
              for line in protocol_lines(m.get("protocol") or {}, len(m["per_fold"])) if line["level"] == "danger"]
    ctx = {"labels": labels, "rows": _rows(metrics_list), "alerts": alerts,
           "plots": [{"title": t, "file": p.relative_to(run).as_posix(), "uri": data_uri(p)} for t, p in plots]}
    atomic_write_text(run / "comparison.md", render(_MD, html=False, **ctx))
    out = run / "comparison.html"
    atomic_write_text(out, render(_HTML, html=True, **ctx))
    return out
