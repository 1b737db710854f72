"""``oncotransfer tune``: the command; the work is experiments.tune."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from oncotransfer.cli_output import Stream, emit_json, reporter

console = Stream()
err = Stream(stderr=True)


def tune(config: Path = typer.Argument(..., help="YAML config: a run config plus a search: section"),
         budget: Optional[str] = typer.Option(None, "--budget", help="wall-clock limit: 30m, 2h, 900 (seconds); "
                                              "default search.budget, else none"),
         trials: Optional[int] = typer.Option(None, "--trials", min=1, help="trials per search (default "
                                              "search.trials)"),
         storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL (default: SQLite in the "
                                               "tune folder; postgresql://... shares one study between processes)"),
         executor: str = typer.Option("local", "--executor", help="how trials run: local (one after the other) or "
                                      "ray (several at once, as Ray tasks)"),
         workers: Optional[int] = typer.Option(None, "--workers", help="ray: trials in flight (default: the "
                                               "cluster's CPUs)"),
         address: Optional[str] = typer.Option(None, "--address", help="ray: the cluster's address (default: "
                                               "RAY_ADDRESS, else a local Ray)"),
         set_: list[str] = typer.Option([], "--set", help="override a key: --set search.trials=10"),
         json_: bool = typer.Option(False, "--json", help="print one JSON document on stdout")) -> None:
    """Search recipes (Optuna) with a nested estimate; train the chosen one as a run. Run again to continue."""
    from oncotransfer.experiments.tune import run_tune
    from oncotransfer.search_config import load_tune_config, parse_budget
    budget_s = parse_budget(budget) if budget is not None else None  # a bad --budget fails before any loading
    cfg, search = load_tune_config(config, set_)
    if budget_s is None and search.budget is not None:
        budget_s = parse_budget(search.budget, "search.budget")
    with reporter(err) as rep:
        res = run_tune(cfg, search, trials=trials, budget_s=budget_s, storage=storage, executor=executor,
                       workers=workers, address=address, progress=rep.progress,
                       log=lambda line: line.startswith("fold ") or rep.log(line))
    if json_:
        emit_json(res.summary)
        return
    lo, hi = res.nested["accuracy_ci95"]
    console.print(f"nested estimate: {res.nested['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f})")
    console.print(f"naive: the chosen model on its own inner folds ({res.summary['naive']['metric']}): "
                  f"{res.naive:.3f}")
    members = [m["trial"] for m in res.summary["ensemble"]["members"]]
    console.print(f"model: trial {members[0]}" if len(members) == 1 else
                  f"model: the mean of trials {', '.join(map(str, members))} (each trained in members/)")
    console.print(f"run: {res.run.run_dir}")
    console.print(f"report: {res.summary['report']}")
