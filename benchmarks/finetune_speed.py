"""Tail fine-tuning: cached prefix activations against recomputing the prefix every epoch; multistage wall time.

    HF_HUB_OFFLINE=1 python benchmarks/finetune_speed.py [--epochs 3] [--data PATH] [--skip-multistage]

For EfficientNet-Lite0 at 224 px on busi-dev (duplicate-grouped 6:2:2 train-val-test split, 3 offline copies, Adam, batch 32),
``freeze: last:1`` (timm's last coarse group: blocks.6, conv_head, bn2) and ``last:2`` (blocks.5 onwards) are
trained for a few epochs twice: ``train.tail_cache: true`` (the prefix runs once per image and view, the tail
trains on its fp16 activations) and ``false`` (the plain loop: images through the whole model every epoch).
The per-epoch time is the median of the epochs after the first, so one-off work (extraction, ONNX export)
is reported apart, in the whole-run column.

Caching alone can at best remove the prefix's forward pass. With F = the tail's share of the forward FLOPs
(counted with ``torch.utils.flop_counter``, as ``roofline.py`` does), an uncached step costs about
(1 - F) + 3F forward passes and a cached one 3F (forward plus a backward of about twice the forward), so the
bound on the speed-up is (1 + 2F) / 3F. It is printed beside each measured row.

Then ``configs/multistage_bus.yaml`` runs end to end at its shipped settings (cell lines -> BUS-250, plus the
direct comparison) and its wall time is printed.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared" / "data").resolve()


def tail_share(freeze: str, size: int = 224) -> float:
    """Share of Lite0's forward FLOPs spent after the cut of ``freeze``."""
    from torch.utils.flop_counter import FlopCounterMode

    from oncotransfer.config import HeadConfig
    from oncotransfer.models.factory import create_classifier
    model = create_classifier("efficientnet_lite0", "none", HeadConfig(), 2, freeze, size).eval()
    prefix, tail, _ = model.tail_split()
    counts = []
    x = torch.randn(1, 3, size, size)
    for part in (prefix, tail.backbone):
        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            x = part(x)
        counts.append(counter.get_total_flops())
    return counts[1] / sum(counts)


def config(data: Path, freeze: str, tail_cache: bool, epochs: int, cache: Path) -> dict:
    return {"name": f"speed-{freeze.replace(':', '')}-{'cached' if tail_cache else 'plain'}",
            "output_dir": str(cache.parent / "runs"),
            "data": {"path": str(data), "image_size": 224},
            "split": {"kind": "train-val-test", "test_size": 0.2, "val_size": 0.2, "seed": 0,
                      "group_by_patient": False, "allow_image_level_split": True},
            "model": {"backbone": "efficientnet_lite0", "weights": "efficientnet_lite0_packaged",
                      "head": {"kind": "paper_dense", "hidden": [100]}, "freeze": freeze},
            "augment": {"mode": "offline", "copies": 3, "rotation": 20, "hflip": True, "zoom": 0.1},
            "train": {"optimizer": "adam", "lr": 1e-4, "epochs": epochs, "batch_size": 32, "seed": 0,
                      "tail_cache": tail_cache, "cache_dir": str(cache), "num_workers": 2},
            "evaluate": {"bootstrap": 1000}}


def measure(data: Path, freeze: str, tail_cache: bool, epochs: int, cache: Path) -> dict:
    from oncotransfer.config import validate
    from oncotransfer.experiments.run import run_experiment
    cfg = validate(config(data, freeze, tail_cache, epochs, cache), "benchmark")
    t0 = time.perf_counter()
    res = run_experiment(cfg)
    wall = time.perf_counter() - t0
    hist = pd.read_csv(res.run_dir / "history.csv")
    steady = hist["seconds"].iloc[1:] if len(hist) > 1 else hist["seconds"]
    pooled = res.metrics["pooled"]
    return {"epoch_s": float(steady.median()), "first_epoch_s": float(hist["seconds"].iloc[0]), "wall_s": wall,
            "accuracy": pooled["accuracy"], "roc_auc": pooled["roc_auc"],
            "val_acc_last": float(hist["val_acc"].iloc[-1]), "train_loss_last": float(hist["train_loss"].iloc[-1])}


def multistage_wall() -> tuple[float, int]:
    cmd = [sys.executable, "-m", "oncotransfer.cli", "train", str(ROOT / "configs" / "multistage_bus.yaml"),
           "--set", f"stages.0.data.path={SHARED / 'cell-lines'}", "--set", f"stages.1.data.path={SHARED / 'bus250'}",
           "--set", f"output_dir={tempfile.mkdtemp(prefix='ms-runs-')}"]
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL).returncode
    return time.perf_counter() - t0, rc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--data", default=str(SHARED / "busi-dev"))
    ap.add_argument("--skip-multistage", action="store_true")
    args = ap.parse_args()
    data = Path(args.data)
    if not (data / "manifest.csv").is_file() and not data.is_dir():
        sys.exit(f"{data}: no data set there; give --data PATH (busi-dev is in ../shared/data)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; data {data}; {args.epochs} epochs per row")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        for freeze in ("last:1", "last:2"):
            share = tail_share(freeze)
            bound = (1 + 2 * share) / (3 * share)
            plain = measure(data, freeze, False, args.epochs, cache)
            cached = measure(data, freeze, True, args.epochs, cache)
            rows.append((freeze, share, bound, plain, cached))
            print(f"| {freeze} | tail {share:.1%} of FLOPs | bound {bound:.2f}x | plain {plain['epoch_s']:.1f} s/epoch "
                  f"| cached {cached['epoch_s']:.1f} s/epoch | speed-up {plain['epoch_s'] / cached['epoch_s']:.2f}x |",
                  flush=True)
    print("\n| freeze | tail share of forward FLOPs | bound from caching alone | plain s/epoch | cached s/epoch "
          "| speed-up | plain whole run s | cached whole run s | plain acc | cached acc | plain AUC | cached AUC |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for freeze, share, bound, p, c in rows:
        print(f"| {freeze} | {share:.1%} | {bound:.2f}x | {p['epoch_s']:.1f} | {c['epoch_s']:.1f} | "
              f"{p['epoch_s'] / c['epoch_s']:.2f}x | {p['wall_s']:.0f} | {c['wall_s']:.0f} | {p['accuracy']:.3f} | "
              f"{c['accuracy']:.3f} | {p['roc_auc']:.3f} | {c['roc_auc']:.3f} |")
    if not args.skip_multistage:
        wall, rc = multistage_wall()
        print(f"\n| configs/multistage_bus.yaml end to end (shipped settings) | {wall / 60:.1f} min | exit {rc} |")


if __name__ == "__main__":
    main()
