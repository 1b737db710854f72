"""A grid on a two-node Ray cluster on loopback against the local executor: wall time and per-run agreement.

    HF_HUB_OFFLINE=1 python benchmarks/ray_grid.py [--quick] [--keep]

The script re-runs itself inside a user + network + PID namespace holding only loopback (``unshare -rn --pid``,
then ``ip link set lo up``): Ray listens on 127.0.0.1 only, and every Ray process ends with the namespace. There
it starts a head (``ray start --head --node-ip-address=127.0.0.1 --num-cpus=1``) and a second node
(``ray start --address=127.0.0.1:PORT --num-cpus=1``), then runs the same grid twice through the CLI, each into
its own grid folder and feature cache: ``oncotransfer grid`` (local executor) and ``oncotransfer grid
--executor ray --address 127.0.0.1:PORT``. It checks that the per-run metrics agree and prints both wall times.

Grid: frozen EfficientNet-Lite0 (packaged ImageNet weights), holdout 90/10 image-level; full: the 720-image
cell-line set (../shared/data/cell-lines; the demo osteosarcoma tiles when absent), 6 lrs × 30/50/100 epochs ×
2 trials = 36 runs; ``--quick``: the demo osteosarcoma tiles, 2 lrs × 10 epochs × 2 trials = 4 runs.

On a 2-core machine the two 1-CPU "nodes" compete for the same cores (and share one disk, so the second node
reads the feature cache the first filled): the speed-up shown is an upper bound of what sharing the cores adds,
not what real nodes give. Ray's per-worker start (importing torch in each node's worker) is part of its time.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
CELLS = (ROOT / "../shared/data/cell-lines").resolve()
_INSIDE = "_ONCOTRANSFER_RAY_BENCH_NS"
NS = ["unshare", "-rn", "--pid", "--fork", "--mount-proc", "--kill-child"]


def reexec_in_namespace() -> int:
    """Run this script again inside a loopback-only namespace; its exit status."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        print("skipped: needs unshare and ip (util-linux, iproute2) for a loopback-only namespace")
        return 0
    cmd = [*NS, "sh", "-c", 'ip link set lo up && exec "$@"', "sh", sys.executable, *sys.argv]
    rc = subprocess.call(cmd, env={**os.environ, _INSIDE: "1"})
    if rc:
        print(f"failed (exit {rc}); `unshare -rn --pid` needs root or unprivileged user namespaces", file=sys.stderr)
    return rc


def grid_file(work: Path, name: str, quick: bool) -> Path:
    data = "demo:osteosarcoma" if quick or not CELLS.is_dir() else str(CELLS)
    base = {"name": "raybench", "data": {"path": data, "image_size": 224},
            "split": {"kind": "holdout", "test_size": 0.1, "group_by_patient": False,
                      "allow_image_level_split": True, "seed": 0},
            "model": {"backbone": "efficientnet_lite0", "weights": "efficientnet_lite0_packaged",
                      "head": {"kind": "paper_dense", "hidden": [100]}, "freeze": "frozen"},
            "train": {"optimizer": "adam", "batch_size": 32, "seed": 0, "cache_dir": str(work / f"cache_{name}")},
            "evaluate": {"bootstrap": 0}}
    grid = {"train.lr": [0.01, 0.001], "train.epochs": [10]} if quick else \
        {"train.lr": [0.1, 0.01, 0.005, 0.001, 0.0005, 0.0001], "train.epochs": [30, 50, 100]}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": "raybench", "base": base, "grid": grid, "trials": 2,
                                    "output_dir": str(work / name), "resources": {"cpus": 1, "gpus": 0}}))
    return path


def timed(cmd: list[str]) -> tuple[float, str]:
    """Wall seconds of a CLI call and its log (stderr)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0, proc.stderr


def max_diffs(a: Path, b: Path) -> tuple[int, float, float]:
    """(runs, max |metric difference| over accuracy/balanced accuracy/ROC-AUC, max |loss difference|)."""
    ra, rb = pd.read_csv(a / "results.csv"), pd.read_csv(b / "results.csv")
    assert list(ra["run_dir"].map(lambda p: Path(p).name)) == list(rb["run_dir"].map(lambda p: Path(p).name))
    metric = float((ra[["accuracy", "balanced_accuracy", "roc_auc"]] -
                    rb[["accuracy", "balanced_accuracy", "roc_auc"]]).abs().max().max())
    loss = 0.0
    for da, db in zip(ra["run_dir"], rb["run_dir"]):
        ha, hb = pd.read_csv(Path(da) / "history.csv"), pd.read_csv(Path(db) / "history.csv")
        loss = max(loss, float((ha[["train_loss", "val_loss"]] - hb[["train_loss", "val_loss"]]).abs().max().max()))
    return len(ra), metric, loss


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="4 runs on the demo osteosarcoma tiles")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--port", type=int, default=6379, help="head port (inside the private namespace)")
    args = ap.parse_args()
    if os.environ.get(_INSIDE) != "1":
        return reexec_in_namespace()
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # head, second node and drivers must agree on it
    ray_cli = str(Path(sys.executable).with_name("ray")) if Path(sys.executable).with_name("ray").exists() else "ray"
    work = Path(tempfile.mkdtemp(prefix="rg", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    address = f"127.0.0.1:{args.port}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    cli = [sys.executable, "-m", "oncotransfer.cli", "grid"]
    try:
        subprocess.run([ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={args.port}",
                        "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats",
                        f"--temp-dir={work / 'ray'}"], check=True, **quiet)
        subprocess.run([ray_cli, "start", f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                        "--disable-usage-stats"], check=True, **quiet)
        import ray
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")
        nodes, cpus = sum(n["Alive"] for n in ray.nodes()), ray.cluster_resources().get("CPU", 0)
        ray.shutdown()
        local_file, ray_file = grid_file(work, "local", args.quick), grid_file(work, "ray", args.quick)
        spec = yaml.safe_load(local_file.read_text())
        print(f"local executor: {spec['base']['data']['path']}, grid {spec['grid']} × 2 trials", file=sys.stderr)
        local_s, _ = timed([*cli, str(local_file)])
        print(f"ray executor: {nodes} nodes, {cpus:g} CPUs", file=sys.stderr)
        ray_s, log = timed([*cli, str(ray_file), "--executor", "ray", "--address", address, "-v"])
        used = len(set(re.findall(r" s on\s+(\S+)", log)))  # run lines end "... 3.2 s on IP/NODE_ID"
        n, metric, loss = max_diffs(work / "local" / "grid_raybench", work / "ray" / "grid_raybench")
    finally:
        subprocess.run([ray_cli, "stop", "--force"], **quiet)  # only this PID namespace's Ray processes
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    agree = metric <= 1e-6 and loss <= 1e-4
    print(f"\nGrid: {n} runs, frozen EfficientNet-Lite0 (packaged weights), data {spec['base']['data']['path']}, "
          f"{json.dumps(spec['grid'])} × 2 trials; Ray: {nodes} nodes on loopback, {cpus:g} CPUs in all, "
          f"1 CPU per run, runs landed on {used} node(s); {os.cpu_count()} cores on this machine")
    print("| executor | wall s | per run s |\n|---|---|---|")
    print(f"| local (one process) | {local_s:.1f} | {local_s / n:.2f} |")
    print(f"| ray, 2 nodes × 1 CPU | {ray_s:.1f} | {ray_s / n:.2f} |")
    print(f"| speed-up local / ray | {local_s / ray_s:.2f}× | >1: ray faster; on a 2-core box an upper bound "
          "(see docstring) |")
    print(f"\nper-run agreement: max |Δ metric| {metric:.2e}, max |Δ loss| {loss:.2e} -> "
          f"{'agree' if agree else 'DIFFER'}")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
