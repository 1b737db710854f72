"""`oncotransfer tune` on busi-dev within a wall-clock budget: the nested estimate beside the naive figure.

    HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/tune.py [--data ../shared/data/busi-dev] [--budget 30m]
        [--config configs/tune_busi.yaml] [--out /tmp/tune-bench] [--set KEY=VALUE ...]

Runs the command line as a user would (one process, the shipped config, a fresh tune folder) and prints one table:
the nested estimate with its 95% CI (the pooled held-out outer folds: what new data should look like), the naive
figure (the final search's chosen model, a trial or the mean of its top trials, on its own inner folds: what a
search says of its winner), the optimism between them, trials finished per search, wall and CPU minutes against
the budget, the final model, and each outer fold's held-out score, the trials it averaged and the best recipe.
Target (issue 20): nested >= 0.88 in 30 minutes on 2 cores, the naive figure beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "busi-dev"))
    ap.add_argument("--budget", default="30m")
    ap.add_argument("--config", default=str(ROOT / "configs" / "tune_busi.yaml"))
    ap.add_argument("--out", default="/tmp/tune-bench")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    cmd = [sys.executable, "-m", "oncotransfer.cli", "tune", args.config, "--budget", args.budget, "--json",
           "--set", f"data.path={args.data}", "--set", f"output_dir={args.out}"]
    for s in args.sets:
        cmd += ["--set", s]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT / "src"))
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.monotonic() - t0
    if res.returncode != 0:
        print(res.stderr[-3000:])
        return res.returncode
    s = json.loads(res.stdout)
    tune_dir = Path(s["run"]).parent
    n = s["nested"]
    lo, hi = n["accuracy_ci95"]
    board = pd.read_csv(tune_dir / "leaderboard.csv")
    print(f"`oncotransfer tune {Path(args.config).name} --budget {args.budget}` on {args.data} "
          f"({os.cpu_count()} cores)\n")
    print("| figure | value |")
    print("|---|---|")
    print(f"| nested estimate (accuracy, pooled held-out outer folds) | {n['accuracy']:.3f} (95% CI {lo:.3f}-{hi:.3f}) |")
    print(f"| naive: the final search's chosen model on its own folds ({s['naive']['metric']}) | {s['naive']['value']:.3f} |")
    print(f"| optimism (naive - nested) | {s['naive']['value'] - n['accuracy']:+.3f} |")
    print(f"| balanced accuracy / ROC AUC (nested) | {n['balanced_accuracy']:.3f} / {n.get('roc_auc') or float('nan'):.3f} |")
    counts = {k: int((board["state"] == k).sum()) for k in ("complete", "pruned", "skipped")}
    print(f"| trials in the final search (complete / pruned / skipped as too slow) | "
          f"{counts['complete']} / {counts['pruned']} / {counts['skipped']} |")
    print(f"| wall minutes (budget {args.budget}) | {wall / 60:.1f} |")
    print(f"| CPU minutes | {s['cpu_minutes']:.1f} |")
    print(f"| best trial's recipe | {json.dumps(s['recipe'])} |")
    ens = s.get("ensemble") or {}
    members = [m["trial"] for m in ens.get("members") or []]
    tried = "; ".join(f"top {r['members']} {r['score']:.3f}" for r in ens.get("tried") or [])
    print(f"| final model | {'trial ' + str(members[0]) if len(members) == 1 else 'mean of trials ' + str(members)}"
          f" (up to {ens.get('cap')} averaged; inner: {tried or 'n/a'}) |")
    print(f"| final run's own {len(json.loads((Path(s['run']) / 'metrics.json').read_text())['per_fold'])}-fold "
          f"accuracy | {json.loads((Path(s['run']) / 'metrics.json').read_text())['pooled']['accuracy']:.3f} |")
    print("\n| outer fold | chosen: inner | held-out | trials averaged | best trial's recipe |")
    print("|---|---|---|---|---|")
    for f in n["per_fold"]:
        print(f"| {f['fold']} | {f['inner_best']:.3f} | {f['test']:.3f} | {f.get('members')} | "
              f"{json.dumps(f['params'])} |")
    print(f"\nrun: {s['run']}\nreport: {s.get('report', tune_dir / 'report.html')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
