"""Cached vs uncached EfficientNet-Lite0 grid on the cell-line set, and feature-extraction throughput.

    HF_HUB_OFFLINE=1 python benchmarks/grid_speed.py [--quick]

Grid: 6 learning rates × 30/50/100 epochs × 5 trials = 90 runs, frozen base, holdout 90/10 image-level.
Cached: the whole grid timed with a fresh feature cache (feature extraction included), run as
``oncotransfer grid`` runs it by default: one worker process per core, each training one head on one core.
Uncached: one run of one epoch with ``feature_cache: false``; its per-epoch time (history.csv) × the grid's
5,400 epochs plus its per-run overhead × 90 runs is the extrapolated time (running it would take hours).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = (ROOT / "../shared/data/cell-lines").resolve()
LRS = [0.1, 0.01, 0.005, 0.001, 0.0005, 0.0001]
EPOCHS = [30, 50, 100]
TRIALS = 5


def base_config(cache: Path, **train) -> dict:
    return {"name": "cells", "data": {"path": str(DATA), "image_size": 224},
            "split": {"kind": "holdout", "test_size": 0.1, "group_by_patient": False,
                      "allow_image_level_split": True, "seed": 0},
            "model": {"backbone": "efficientnet_lite0", "weights": "efficientnet_lite0_packaged",
                      "head": {"kind": "paper_dense", "hidden": [100]}, "freeze": "frozen"},
            "train": {"optimizer": "adam", "batch_size": 32, "seed": 0, "cache_dir": str(cache), **train},
            "evaluate": {"bootstrap": 1000}}


def cached_grid(work: Path, lrs: list[float], epochs: list[int], trials: int) -> tuple[float, int, int, int]:
    """(seconds, runs, epochs in all, worker processes) of the whole grid with the default local executor."""
    from oncotransfer.experiments import expand, load_grid, run_grid
    from oncotransfer.experiments.local_executor import default_workers
    grid = {"name": "speed", "base": base_config(work / "cache"), "trials": trials, "output_dir": str(work),
            "grid": {"train.lr": lrs, "train.epochs": epochs}}
    (work / "grid.yaml").write_text(yaml.safe_dump(grid))
    spec = load_grid(work / "grid.yaml")
    t0 = time.perf_counter()
    summary = run_grid(spec, log=lambda s: print("  " + s, file=sys.stderr, flush=True))
    return (time.perf_counter() - t0, int(summary["n"].sum()), sum(epochs) * len(lrs) * trials,
            default_workers(expand(spec)))


def uncached_estimate(work: Path, n_runs: int, total_epochs: int) -> tuple[float, float, float]:
    """(extrapolated grid seconds, seconds per uncached epoch, per-run overhead seconds) from a 1-epoch run."""
    from oncotransfer.config import validate
    from oncotransfer.experiments.run import run_experiment
    cfg = validate(base_config(work / "cache_uncached", feature_cache=False, epochs=1, lr=0.001))
    t0 = time.perf_counter()
    res = run_experiment(cfg, work / "uncached_run", report=False)
    from oncotransfer.evaluate.report import evaluate_run
    evaluate_run(res.run_dir, plots=False)
    total = time.perf_counter() - t0
    epoch = float(pd.read_csv(res.run_dir / "history.csv")["seconds"].sum())
    overhead = total - epoch
    return epoch * total_epochs + overhead * n_runs, epoch, overhead


def _median_rate(fn, n: int, repeats: int = 3) -> float:
    """Images/s of ``fn`` (which processes ``n`` images), the median of ``repeats`` timed calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n / sorted(times)[len(times) // 2]


def throughput(n: int = 64) -> list[tuple[str, str, float]]:
    """Images/s at 224 px (random weights) for torch eager fp32, torch channels_last and ONNX Runtime, batch 32,
    each the median of 3 passes over ``n`` images."""
    from oncotransfer.config import HeadConfig
    from oncotransfer.runtime import export_onnx, ort_session, run_session
    from oncotransfer.models.factory import create_classifier
    rows = []
    x = torch.randn(n, 3, 224, 224)
    for name in ("efficientnet_lite0", "mobilenet_v2"):
        bb = create_classifier(name, "none", HeadConfig(), 2, "frozen", 224).backbone.eval()
        with torch.inference_mode():
            for label, net, inp in (("torch eager fp32", bb, x),
                                    ("torch channels_last fp32", bb.to(memory_format=torch.channels_last),
                                     x.contiguous(memory_format=torch.channels_last))):
                net(inp[:8])
                rows.append((name, label, _median_rate(lambda: [net(inp[s:s + 32]) for s in range(0, n, 32)], n)))
        bb = bb.to(memory_format=torch.contiguous_format)
        with tempfile.TemporaryDirectory() as d:
            sess = ort_session(export_onnx(bb, Path(d) / "m.onnx", 224))
            run_session(sess, x[:8].numpy())
            rows.append((name, "onnxruntime fp32", _median_rate(lambda: run_session(sess, x.numpy(), 32), n)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="2 lrs × 30 epochs × 1 trial, to check the script")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    if not DATA.is_dir():
        print(f"skipped: {DATA} not found (the 720-image cell-line set); nothing measured")
        return
    work = Path(tempfile.mkdtemp(prefix="grid_speed_"))
    lrs, epochs, trials = (LRS[:2], [30], 1) if args.quick else (LRS, EPOCHS, TRIALS)
    try:
        cached_s, n_runs, total_epochs, workers = cached_grid(work, lrs, epochs, trials)
        uncached_s, per_epoch, overhead = uncached_estimate(work, n_runs, total_epochs)
        tp = throughput()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nGrid: EfficientNet-Lite0 (packaged ImageNet weights), frozen, {len(lrs)} lrs × {epochs} epochs × "
          f"{trials} trials = {n_runs} runs, {total_epochs} epochs in all; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print("| path | seconds | note |\n|---|---|---|")
    print(f"| cached (fresh cache, extraction included) | {cached_s:.1f} | measured, whole grid, "
          f"{workers} worker process(es) |")
    print(f"| uncached (extrapolated) | {uncached_s:.0f} | {per_epoch:.1f} s/epoch × {total_epochs} epochs + "
          f"{overhead:.1f} s/run × {n_runs} runs, from one measured 1-epoch run |")
    print(f"| ratio uncached / cached | {uncached_s / cached_s:.0f}× | target >= 20×; cached target < 300 s |")
    print("\nFeature extraction at 224 px, random weights, batch 32 (images/s; target >= 100)")
    print("| backbone | engine | images/s |\n|---|---|---|")
    for name, label, ips in tp:
        print(f"| {name} | {label} | {ips:.1f} |")
    from roofline import print_feasibility  # the feature cache extracts with ONNX Runtime on a CPU
    print_feasibility({(name, "feature extraction, batch 32 (issue 3)"): ips
                       for name, label, ips in tp if label == "onnxruntime fp32"}, only="issue 3")


if __name__ == "__main__":
    main()
