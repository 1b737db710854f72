"""The cached ``last:2`` training step inside a run against the same tail step in isolation.

    HF_HUB_OFFLINE=1 python benchmarks/tail_step.py [--data PATH] [--rounds 5] [--batches 4] [--profile]

EfficientNet-Lite0 at 224 px, ``freeze: last:2`` (blocks.5 onwards train on cached blocks.4 activations,
(32, 112, 14, 14) per batch), Adam, batch 32, the run's default ``train.fast_cpu: true``. The activations come
from a real ``ActivationBank`` built by ``train.tail_inputs`` on busi-dev (one offline copy, so batches mix two
views, as an offline-augmented run's do). Interleaved, ``--rounds`` times, each over the same ``--batches``
batches of one epoch's order:

* (a) run path: ``train.loop.train_one_epoch`` over the run's ``_Gathered`` batches (gather from the bank,
  fp16 -> fp32, the run's memory format, autocast as ``train.device.autocast`` chooses, loss, Adam step,
  accuracy bookkeeping), with the module, optimizer and thread count as ``train.fold.train_fold`` sets them;
* (b) bare step: the same module's forward, loss, backward and Adam step in fp32 on the same batches,
  gathered beforehand (contiguous NCHW, as a step is usually timed in isolation).

Each round reports wall time and process CPU time per step (CPU time counts what this process computed,
so it is steadier than wall time on a loaded machine); the table gives the fastest round of each. With
``--profile`` a torch.profiler pass over each path prints the ops whose self-CPU time differs most.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared" / "data").resolve()


def build(data_path: Path, cache: Path):
    """(module, optimizer, loss, batches of one epoch, device, fast) as ``train_fold`` builds them for last:2."""
    from oncotransfer.config import validate
    from oncotransfer.data.augment import Augmenter
    from oncotransfer.data.splits import Fold
    from oncotransfer.models.factory import classifier_for
    from oncotransfer.train.activations import ActivationCache
    from oncotransfer.train.data import load_data
    from oncotransfer.train.device import pick_device, prepare
    from oncotransfer.train.fold import _cache_key
    from oncotransfer.train.features import resolve_engine
    from oncotransfer.train.loop import make_optimizer
    from oncotransfer.train.tail_inputs import tail_inputs

    cfg = validate({"name": "tail-step", "data": {"path": str(data_path), "image_size": 224},
                    "model": {"backbone": "efficientnet_lite0", "weights": "efficientnet_lite0_packaged",
                              "head": {"kind": "paper_dense", "hidden": [100]}, "freeze": "last:2"},
                    "augment": {"mode": "offline", "copies": 1, "rotation": 20, "hflip": True, "zoom": 0.1},
                    "train": {"optimizer": "adam", "lr": 1e-4, "batch_size": 32, "seed": 0,
                              "cache_dir": str(cache)}}, "benchmark")
    device = pick_device("cpu")
    data = load_data(cfg.data, 224, phash=False)
    n = len(data.manifest)
    idx = np.random.default_rng(0).permutation(n)
    fold = Fold(0, np.sort(idx[: int(0.6 * n)]), np.sort(idx[int(0.6 * n): int(0.8 * n)]), np.sort(idx[int(0.8 * n):]))
    torch.manual_seed(0)
    model = prepare(classifier_for(cfg.model, 2, 224, 0), device, cfg.train.fast_cpu)
    prefix, module, cut = model.tail_split()
    engine = resolve_engine(cfg.train.feature_engine, device)
    act = ActivationCache(cache, {**_cache_key(model, cfg, engine, device), "cut": cut}, engine)
    inputs = tail_inputs(prefix, model.spec.mean, model.spec.std, data.images, data.manifest.labels,
                         data.manifest.sha256, fold, cfg, act, device, Augmenter(cfg.augment), cut)
    opt = make_optimizer(cfg.train.optimizer, module, cfg.train.lr)
    return module, opt, model.head.loss(None, 0.0), inputs, device, cfg.train.fast_cpu


def bare_steps(module, opt, loss_fn, batches, cast=None) -> None:
    module.train()
    for x, y in batches:
        with cast or contextlib.nullcontext():
            logits = module(x)
        loss = loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(SHARED / "busi-dev"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--variants", action="store_true", help="also time the steps between (a) and (b)")
    ap.add_argument("--cache", default=None, help="activation cache dir to keep between runs (default: a temp dir)")
    args = ap.parse_args()
    from oncotransfer.train.device import precision_label
    from oncotransfer.train.loop import train_one_epoch

    with tempfile.TemporaryDirectory() as tmp:
        module, opt, loss_fn, inputs, device, fast = build(Path(args.data), Path(args.cache or Path(tmp) / "cache"))
        k = args.batches
        run_batches = lambda: itertools.islice(iter(inputs.train(0)), k)  # noqa: E731 - the run's own batches
        pre = [(x.contiguous(), y) for x, y in run_batches()]  # the same tensors, gathered beforehand, NCHW
        # Each path trains its own copy from the same state, so neither sees the other's weights or Adam moments.
        mod_b = copy.deepcopy(module)
        opt_b = torch.optim.Adam([p for p in mod_b.parameters() if p.requires_grad], lr=1e-4)
        a = lambda: train_one_epoch(module, run_batches(), opt, loss_fn, device, fast)  # noqa: E731
        b = lambda: bare_steps(mod_b, opt_b, loss_fn, pre)  # noqa: E731
        paths = {"a": a, "b": b}
        if args.variants:
            def own(cast=None, cl=False, nchw=False):
                m = copy.deepcopy(mod_b)
                if nchw:
                    m = m.to(memory_format=torch.contiguous_format)
                o = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-4)
                xs = [(x.contiguous(memory_format=torch.channels_last) if cl else x, y) for x, y in pre]
                return lambda: bare_steps(m, o, loss_fn, xs, cast)
            mod_c = copy.deepcopy(module)
            opt_c = torch.optim.Adam([p for p in mod_c.parameters() if p.requires_grad], lr=1e-4)
            paths["a, autocast off"] = lambda: train_one_epoch(mod_c, run_batches(), opt_c, loss_fn, device, False)
            paths["b, channels_last input"] = own(cl=True)
            paths["b, bf16 autocast, channels_last"] = own(torch.autocast("cpu", dtype=torch.bfloat16), True)
            paths["b, NCHW weights and input"] = own(nchw=True)
        for fn in paths.values():
            fn()  # warm-up: oneDNN primitives, Adam state
        res = {key: [] for key in paths}
        for _ in range(args.rounds):
            for key, fn in paths.items():
                res[key].append(timed(fn))
        prec = precision_label(device, fast)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, run precision: {prec}; "
              f"Lite0 last:2, 224 px, batch 32, {k} batches x {args.rounds} rounds, interleaved")
        print("\n| path | wall ms/step (fastest round) | CPU ms/step (fastest round) | wall median |")
        print("|---|---:|---:|---:|")
        labels = {"a": "(a) run path: train_one_epoch over _Gathered", "b": "(b) bare fp32 step, pre-gathered NCHW"}
        for key in res:
            label = labels.get(key, key)
            w = [t[0] / k * 1e3 for t in res[key]]
            c = [t[1] / k * 1e3 for t in res[key]]
            print(f"| {label} | {min(w):.0f} | {min(c):.0f} | {np.median(w):.0f} |")
        ratio_w = min(t[0] for t in res["a"]) / min(t[0] for t in res["b"])
        ratio_c = min(t[1] for t in res["a"]) / min(t[1] for t in res["b"])
        print(f"| (a) / (b) | {ratio_w:.2f}x | {ratio_c:.2f}x | |")
        if args.profile:
            profile(a, b)


def profile(a, b, top: int = 15) -> None:
    """Self-CPU time per op of (a) and of (b); the ops where (a) spends most beyond (b)."""
    from torch.profiler import ProfilerActivity, profile as prof
    tables = []
    for fn in (a, b):
        with prof(activities=[ProfilerActivity.CPU]) as p:
            fn()
        tables.append({e.key: (e.self_cpu_time_total / 1e3, e.count) for e in p.key_averages()})
    ta, tb = tables
    keys = sorted(set(ta) | set(tb), key=lambda k: -(ta.get(k, (0, 0))[0] - tb.get(k, (0, 0))[0]))
    print(f"\nself-CPU ms over the batches: (a) total {sum(v[0] for v in ta.values()):.0f}, "
          f"(b) total {sum(v[0] for v in tb.values()):.0f}")
    print("\n| op | (a) ms | (b) ms | (a) - (b) ms | (a) calls | (b) calls |")
    print("|---|---:|---:|---:|---:|---:|")
    for key in keys[:top]:
        (ma, ca), (mb, cb) = ta.get(key, (0, 0)), tb.get(key, (0, 0))
        print(f"| {key} | {ma:.1f} | {mb:.1f} | {ma - mb:+.1f} | {ca} | {cb} |")


if __name__ == "__main__":
    sys.exit(main())
