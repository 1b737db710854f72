"""Scoring cost of a fold ensemble against one member: is the ensemble of 5 close to one prefix and 5 tails?

    HF_HUB_OFFLINE=1 python benchmarks/scoring.py [--images 64] [--size 224] [--repeats 2] [--threads 1]
        [--folds 5] [--freeze last:2 last:1 frozen] [--run RUN_DIR [--data PATH] [--e2e-images 100]]

With ``--run``, the end-to-end rows of benchmarks/scoring_e2e.py follow in the same run (predict with the
ensemble and with one fold, evaluate --data, serve's request rate).

Members: 5 copies of the packaged EfficientNet-Lite0 classifier (paper head, 2 classes) whose trainable
tensors (the tail and head under ``freeze``) are perturbed per copy, as a run's folds differ; the frozen
stages stay equal, as in a real run. Model time per image: the fastest of ``--repeats`` passes over
``--images`` normalised images in batches of 32 (probabilities out), every engine's passes taken in turn after
a warm-up pass of each (``per_image``), for one member and for the ensemble: PyTorch eager with every member
running its whole backbone (unshared), PyTorch eager with the shared prefix run once (``models.ensemble``), and
ONNX Runtime on the exported graph (one member's graph vs the ensemble's, which holds one prefix). The FLOP bound of the ensemble is
(prefix + folds x (tail + head)) / (one member), from ``torch.utils.flop_counter.FlopCounterMode``.
Targets (ratios from one run): last:2 <= 2.6x one member, last:1 <= 1.7x, frozen <= 1.1x.
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGETS = {"last:2": 2.6, "last:1": 1.7, "frozen": 1.1}
BATCH = 32


def members(freeze: str, folds: int, size: int) -> list[torch.nn.Module]:
    from oncotransfer.config import HeadConfig
    from oncotransfer.models.factory import create_classifier
    torch.manual_seed(0)
    base = create_classifier("efficientnet_lite0", "efficientnet_lite0_packaged", HeadConfig(), 2, freeze, size)
    out = []
    for k in range(folds):
        m = copy.deepcopy(base)
        g = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        out.append(m.eval())
    return out


def flops(module: torch.nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        module(x)
    return counter.get_total_flops()


def flop_bound(ens, x: torch.Tensor) -> tuple[float, float]:
    """(ensemble FLOPs / one member's, the prefix's share of one member's FLOPs)."""
    m = ens.members[0]
    full = flops(m, x)
    group = ens.groups[0]
    prefix = flops(group.prefix, x)
    with torch.inference_mode():
        a = group.prefix(x)
    tail = group.units[0][0]
    feats_flops = flops(tail, a) if tail is not None else 0
    with torch.inference_mode():
        f = tail(a) if tail is not None else a
    head = flops(m.head, f)
    n = len(ens.members)
    return (prefix + n * (feats_flops + head)) / full, prefix / full


def per_image(fns: dict, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Seconds per image of each of ``fns`` over ``x`` in batches of 32: the fastest of ``repeats`` passes,
    taken in turn (one pass of each, then again), after a warm-up pass of each: on a shared machine, load that
    comes and goes then hits every engine alike, and the fastest pass is the one least disturbed by it."""
    def once(fn):
        for s in range(0, len(x), BATCH):
            fn(x[s:s + BATCH])
    for fn in fns.values():
        once(fn)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            once(fn)
            times[k].append(time.perf_counter() - t0)
    return {k: min(v) / len(x) for k, v in times.items()}


def torch_fn(module):
    def run(x):
        with torch.inference_mode():
            return module(x)
    return run


def ort_fn(module, path: Path, size: int, threads: int):
    from oncotransfer.runtime import export_onnx, ort_session
    sess = ort_session(export_onnx(module, path, size), threads)
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: np.ascontiguousarray(x.numpy())})


def bench(freeze: str, args, tmp: Path) -> list[tuple]:
    from oncotransfer.infer.export import ProbabilityModel
    from oncotransfer.models.ensemble import Ensemble
    ms = members(freeze, args.folds, args.size)
    shared, unshared = Ensemble(ms).eval(), Ensemble(ms, equal_weights=False).eval()
    assert len(unshared.groups) == len(ms)  # separate objects: every member runs its whole backbone
    bound, prefix_share = flop_bound(shared, torch.randn(1, 3, args.size, args.size))
    x = torch.randn(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    one_model, ens_model = ProbabilityModel(ms[0]).eval(), ProbabilityModel(shared).eval()
    with torch.inference_mode():
        diff = float((ens_model(x[:8]) - ProbabilityModel(unshared).eval()(x[:8])).abs().max())
    t = per_image({"one": torch_fn(one_model), "unshared": torch_fn(unshared), "shared": torch_fn(ens_model),
                   "one_ort": ort_fn(one_model, tmp / f"{freeze}_one.onnx", args.size, args.threads),
                   "ens_ort": ort_fn(ens_model, tmp / f"{freeze}_ens.onnx", args.size, args.threads)},
                  x, args.repeats)
    rows = [(freeze, "PyTorch eager, unshared", t["one"], t["unshared"]),
            (freeze, "PyTorch eager, shared prefix", t["one"], t["shared"]),
            (freeze, "ONNX Runtime, shared prefix", t["one_ort"], t["ens_ort"])]
    return [(*r, bound, prefix_share, diff, shared.sharing_line()) for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="PyTorch and ONNX Runtime threads (same for both)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--freeze", nargs="+", default=list(TARGETS))
    ap.add_argument("--run", type=Path, help="a multi-fold run: also time predict, evaluate --data and serve end to "
                                             "end on it (benchmarks/scoring_e2e.py), in this run")
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data" / "busi-dev")
    ap.add_argument("--e2e-images", dest="e2e_images", type=int, default=100)
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for freeze in args.freeze:
            rows += bench(freeze, args, Path(tmp))
    print(f"\nLite0 at {args.size} px, {args.images} images in batches of {BATCH}, fastest of {args.repeats}, "
          f"{args.threads} thread(s); ensemble of {args.folds} vs one member (model time per image)\n")
    print(f"{'freeze':<8} {'engine':<30} {'1 member ms':>11} {'ensemble ms':>11} {'ratio':>6} "
          f"{'FLOP bound':>10} {'target':>6}  {'prefix':>6}  {'max |p diff|':>12}")
    for freeze, engine, one, ens, bound, share, diff, _ in rows:
        print(f"{freeze:<8} {engine:<30} {one * 1e3:11.2f} {ens * 1e3:11.2f} {ens / one:5.2f}x "
              f"{bound:9.2f}x {TARGETS.get(freeze, float('nan')):5.1f}x  {share:6.0%}  {diff:12.1e}")
    print("\nprefix: the shared prefix's share of one member's FLOPs; max |p diff|: shared vs unshared "
          "PyTorch probabilities on 8 images")
    for freeze in dict.fromkeys(r[0] for r in rows):
        print(f"{freeze}: {next(r[-1] for r in rows if r[0] == freeze)}")
    if args.run:
        import sys
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import scoring_e2e
        torch.set_num_threads(os.cpu_count() or 1)  # end to end: the commands' own threading
        scoring_e2e.report(argparse.Namespace(run=args.run, data=args.data, images=args.e2e_images,
                                              requests=args.requests))


if __name__ == "__main__":
    main()
