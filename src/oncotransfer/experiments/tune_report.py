"""A tune's report (TUNE_DIR/report.md and report.html): the nested estimate against the naive figure, the
chosen recipe as YAML, the optimisation history, parameter importances and the leaderboard of trials."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from oncotransfer.config import ExperimentConfig
from oncotransfer.evaluate.plots import save_figure
from oncotransfer.evaluate.render import fmt, fmt_ci, write_report
from oncotransfer.experiments.tune_space import recipe_yaml
from oncotransfer.search_config import SearchConfig

TOP = 30  # leaderboard rows in the report; leaderboard.csv holds every trial


def leaderboard(study, optuna) -> pd.DataFrame:
    """The finished trials, best first: number, state (``skipped``: pruned before training, too slow for the
    time left), inner score, minutes, the cost estimate before the machine factor, then the recipe's parameters."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    rows = []
    for t in study.get_trials(deepcopy=False, states=states):
        minutes = (t.duration.total_seconds() / 60) if t.duration is not None else None
        value = t.value if t.value is not None else max(t.intermediate_values.values(), default=None)
        est = t.user_attrs.get("estimate_s")
        state = "skipped" if t.user_attrs.get("skipped") else t.state.name.lower()
        rows.append({"trial": t.number, "state": state, "inner_score": value,
                     "folds_scored": len(t.intermediate_values), "minutes": minutes,
                     "estimated_minutes": None if est is None else est / 60,
                     "note": t.user_attrs.get("skipped", ""), **t.params})
    board = pd.DataFrame(rows)
    if board.empty:
        return board
    board["_complete"] = board["state"] == "complete"
    board = board.sort_values(["_complete", "inner_score", "trial"], ascending=[False, False, True])
    return board.drop(columns="_complete").reset_index(drop=True)


def plot_history(study, optuna, metric: str) -> Figure:
    """Each finished trial's inner score by trial number (pruned ones at their last reported score) and the
    best so far."""
    fig = Figure(figsize=(6.4, 3.6))
    ax = fig.add_subplot()
    done = sorted(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)), key=lambda t: t.number)
    pruned = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,))
    ax.scatter([t.number for t in done], [t.value for t in done], s=18, color="tab:blue", label="complete")
    if pruned:
        ax.scatter([t.number for t in pruned], [max(t.intermediate_values.values(), default=np.nan) for t in pruned],
                   s=18, marker="x", color="tab:gray", label="pruned (last reported)")
    if done:
        ax.step([t.number for t in done], np.maximum.accumulate([t.value for t in done]), where="post",
                color="tab:red", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"inner {metric}")
    ax.set_title("Optimisation history (final search)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def importances(study, optuna) -> tuple[dict[str, float], str]:
    """fANOVA importances of the final search, or why there are none."""
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    varying = {k for t in done for k in t.params if len({repr(u.params.get(k)) for u in done}) > 1}
    if len(done) < 2 or not varying:
        return {}, "fewer than 2 completed trials, or no searched parameter varied among them"
    try:
        return optuna.importance.get_param_importances(study, params=sorted(varying)), ""
    except (RuntimeError, ValueError) as e:  # too few distinct trials for the evaluator's forest
        return {}, f"Optuna could not compute them ({str(e).splitlines()[0][:150]})"


def write_tune_report(tune_dir: Path, study, outer_studies: list, summary: dict[str, Any],
                      chosen: ExperimentConfig, search: SearchConfig, optuna) -> Path:
    """Write report.md and report.html into ``tune_dir``; return the HTML's path."""
    metric, nested, ens = search.metric, summary["nested"], summary.get("ensemble") or {}
    nested_value = nested.get(metric)
    ci = nested.get(f"{metric}_ci95")
    naive = summary["naive"]["value"]
    estimate = {
        "metric": metric, "n": nested["n"], "nested": fmt_ci(nested_value, ci), "naive": fmt(naive),
        "optimism": fmt(naive - nested_value) if nested_value is not None else "n/a",
        "per_fold": [[p["fold"], fmt(p["inner_best"]), fmt(p["test"]),
                      ", ".join(str(n) for n in p.get("members") or []), _recipe_text(p["params"])]
                     for p in nested["per_fold"]],
        "trials": summary["trials_per_search"], "searches": len(outer_studies) + 1,
        "executor": summary.get("executor", "local"), "minutes": fmt(summary["seconds"] / 60, 1),
        "cpu_minutes": fmt(summary["cpu_minutes"], 1)}
    history = save_figure(plot_history(study, optuna, metric), tune_dir / "plots" / "history.png")
    found, why = importances(study, optuna)
    board = leaderboard(study, optuna)
    raw = [c for c in board.columns if c == "lr"]
    sections = [
        ("tune/estimate.md.j2", estimate),
        ("tune/recipe.md.j2", {"run": summary["run"],
                               "recipe_yaml": recipe_yaml(chosen, summary["recipe"]).rstrip("\n"),
                               "members": [m["trial"] for m in ens.get("members") or []], "cap": ens.get("cap"),
                               "wanted": search.ensemble,
                               "tried": "; ".join(f"top {r['members']}: {fmt(r['score'])}"
                                                  for r in ens.get("tried") or [])}),
        ("plots.md.j2", {"plots": [{"title": "Optimisation history", "file": history.relative_to(tune_dir)
                                    .as_posix()}]}),
        ("tune/importance.md.j2", {"rows": [[k, fmt(v)] for k, v in found.items()], "why": why}),
        ("tune/leaderboard.md.j2", {"board": board.head(TOP), "raw": raw, "more": max(0, len(board) - TOP)}),
    ]
    return write_report(tune_dir, "report", f"Tune report: {chosen.name}", sections)


def _recipe_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={fmt(v, 5) if isinstance(v, float) else v}" for k, v in sorted(params.items()))

