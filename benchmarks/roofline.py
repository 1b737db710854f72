"""Can this CPU reach a speed target at all? Compute each target's arithmetic against the CPU's fp32 peak.

    HF_HUB_OFFLINE=1 python benchmarks/roofline.py

A CNN forward pass needs a fixed number of floating-point operations per image (counted here with
``torch.utils.flop_counter`` on the backbone at 224 px). A throughput target therefore needs
``GFLOP/image × images/s`` GFLOP/s of fp32 arithmetic. No convolution kernel sustains more than a large
single-precision matrix multiply (SGEMM) does: SGEMM keeps every FMA unit busy with data in cache, while
depthwise and 1×1 convolutions are memory-bound. The measured SGEMM rate on all cores is therefore an
upper bound on what any fp32 engine (PyTorch, ONNX Runtime, OpenVINO) can deliver; a target that needs
more is out of reach on this machine in fp32, and one that needs over 75% of it is at the edge (a
depthwise-separable network reaching that share of a dense SGEMM is already exceptional).

``grid_speed.py`` and ``inference.py`` import this module to print the same verdict beside their timings.
"""
from __future__ import annotations

import os
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# (backbone, what, target, unit): images/s targets for batch 32, milliseconds for one image
TARGETS = [
    ("efficientnet_lite0", "feature extraction, batch 32 (issue 3)", 100, "img/s"),
    ("mobilenet_v2", "feature extraction, batch 32 (issue 3)", 100, "img/s"),
    ("efficientnet_lite0", "ORT inference, batch 32 (issue 5)", 150, "img/s"),
    ("mobilenet_v2", "ORT inference, batch 32 (issue 5)", 150, "img/s"),
    ("efficientnet_lite0", "ORT inference, one image (issue 5)", 10, "ms"),
    ("mobilenet_v2", "ORT inference, one image (issue 5)", 10, "ms"),
]


def sgemm_peak_gflops(threads: int | None = None, n: int = 2048, repeats: int = 8) -> float:
    """Best fp32 matrix-multiply rate (GFLOP/s) over ``repeats`` n×n products on ``threads`` threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        for _ in range(2):
            a @ b
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        return 2 * n ** 3 / best / 1e9
    finally:
        torch.set_num_threads(old)


def backbone_gflop(name: str, size: int = 224) -> float:
    """Forward-pass GFLOP per image (2 × multiply-adds) of the registry backbone ``name`` at ``size`` px."""
    from torch.utils.flop_counter import FlopCounterMode

    from oncotransfer.config import HeadConfig
    from oncotransfer.models.factory import create_classifier
    net = create_classifier(name, "none", HeadConfig(), 2, "frozen", size).backbone.eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        net(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def needed_gflops(gflop: float, target: float, unit: str) -> float:
    """GFLOP/s a target needs: images/s × GFLOP/image, or GFLOP/image ÷ seconds for a latency target."""
    return gflop * target if unit == "img/s" else gflop / (target / 1e3)


def verdict(need: float, peak: float) -> str:
    share = need / peak
    if share > 1:
        return f"needs {share:.0%} of peak: out of reach in fp32"
    return f"needs {share:.0%} of peak: " + ("at the edge" if share > 0.75 else "reachable")


def print_feasibility(measured: dict[tuple[str, str], float] | None = None, peak: float | None = None,
                      gflop: dict[str, float] | None = None, only: str = "") -> None:
    """Markdown table of every target's required GFLOP/s against the SGEMM peak, with measured values if given.

    ``measured`` maps (backbone, what) of ``TARGETS`` to the measured images/s or ms; ``only`` keeps the
    targets whose description contains it (e.g. "issue 3").
    """
    peak = peak or sgemm_peak_gflops()
    gflop = gflop or {name: backbone_gflop(name) for name in {t[0] for t in TARGETS}}
    measured = measured or {}
    print(f"\nRoofline: fp32 SGEMM peak on {len(os.sched_getaffinity(0))} cores = {peak:.1f} GFLOP/s "
          "(the most any fp32 engine can sustain here)")
    print("| backbone | target | GFLOP/image | needs GFLOP/s | verdict | measured | achieved GFLOP/s |")
    print("|---|---|---:|---:|---|---:|---:|")
    for name, what, target, unit in (t for t in TARGETS if only in t[1]):
        need = needed_gflops(gflop[name], target, unit)
        got = measured.get((name, what))
        shown = "-" if got is None else f"{got:.1f} {unit}"
        rate = None if got is None else needed_gflops(gflop[name], got, unit)
        achieved = "-" if rate is None else f"{rate:.1f} ({rate / peak:.0%} of peak)"
        print(f"| {name} | {what}: {'>=' if unit == 'img/s' else '<='} {target} {unit} | {gflop[name]:.3f} | "
              f"{need:.1f} | {verdict(need, peak)} | {shown} | {achieved} |")


if __name__ == "__main__":
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print_feasibility()
