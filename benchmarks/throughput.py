"""Training throughput (images/s) per registered backbone on this machine's CPU.

For each backbone (random weights; throughput does not depend on the values) and each precision:

* frozen, features each step   backbone forward in eval/inference mode + head forward/backward/Adam step
* frozen, cached features      head step on pre-computed pooled features: what a frozen run with
                               ``train.feature_cache: true`` (the default) pays per epoch once features exist
* fine-tune                    whole model forward + backward + Adam step, train mode

Precisions: fp32, fp32 + channels_last, channels_last + bf16 autocast. bf16 is FORCED here even where
``train.device.autocast`` would not enable it: on CPUs without native bf16 (AVX2 only) PyTorch emulates it,
and this table shows what that costs.

    .venv/bin/python benchmarks/throughput.py --backbones efficientnet_lite0,mobilenet_v2 --iters 2
"""
from __future__ import annotations

import argparse
import contextlib
import platform
import time

import torch
from torch import nn

from oncotransfer.config import HeadConfig
from oncotransfer.models import BACKBONES, create_classifier
from oncotransfer.train.device import cpu_bf16_native

PRECISIONS = ("fp32", "channels_last", "channels_last+bf16")


def _ctx(precision: str):
    if precision.endswith("bf16"):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _timed(step, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    return time.perf_counter() - t0


def bench_backbone(name: str, batch: int, size: int | None, iters: int, warmup: int,
                   precisions: tuple[str, ...]) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    frozen = create_classifier(name, "none", HeadConfig(kind="paper_dense", hidden=[100]), 3, "frozen", size)
    tuned = create_classifier(name, "none", HeadConfig(kind="paper_dense", hidden=[100]), 3, "finetune", size)
    s = frozen.image_size
    x32 = torch.randn(batch, 3, s, s)
    y = torch.randint(0, 3, (batch,))
    loss_fn = nn.CrossEntropyLoss()

    # cached features: only the head trains; the code runs it in fp32 whatever the precision setting
    feats = torch.randn(batch, frozen.num_features)
    head_opt = torch.optim.Adam(frozen.head.parameters(), lr=1e-3)

    def head_step(f: torch.Tensor) -> None:
        loss = loss_fn(frozen.head(f.float()), y)
        head_opt.zero_grad(set_to_none=True)
        loss.backward()
        head_opt.step()

    frozen.train()
    cached_s = _timed(lambda: head_step(feats), max(iters * 20, 50), warmup)
    cached_ips = batch * max(iters * 20, 50) / cached_s

    for prec in precisions:
        cl = prec.startswith("channels_last")
        fmt = torch.channels_last if cl else torch.contiguous_format
        fm = frozen.to(memory_format=fmt)
        tm = tuned.to(memory_format=fmt)
        x = x32.contiguous(memory_format=fmt)

        def frozen_step() -> None:
            fm.train()                          # keeps the frozen backbone in eval (see Classifier.train)
            with torch.inference_mode(), _ctx(prec):
                f = fm.backbone(x).float()
            head_step(f.clone())

        opt = torch.optim.Adam([p for p in tm.parameters() if p.requires_grad], lr=1e-4)

        def finetune_step() -> None:
            tm.train()
            with _ctx(prec):
                logits = tm(x)
            loss = loss_fn(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        fz = _timed(frozen_step, iters, warmup)
        ft = _timed(finetune_step, iters, warmup)
        rows.append({"backbone": name, "size": s, "precision": prec,
                     "frozen": batch * iters / fz,
                     "cached": cached_ips if prec == "fp32" else None,
                     "finetune": batch * iters / ft})
        r = rows[-1]  # progress as we go: the emulated-bf16 rows of the big backbones take minutes
        print(f"  {name} {prec}: frozen {r['frozen']:.1f}, finetune {r['finetune']:.1f} images/s", flush=True)
    return rows


def render(rows: list[dict], title: str) -> None:
    def fmt(v):
        return "-" if v is None else f"{v:,.1f}"
    try:
        from rich.console import Console
        from rich.table import Table
        t = Table(title=title)
        for col in ("backbone", "px", "precision", "frozen, features each step", "frozen, cached features",
                    "fine-tune"):
            t.add_column(col, justify="left" if col in ("backbone", "precision") else "right")
        for r in rows:
            t.add_row(r["backbone"], str(r["size"]), r["precision"], fmt(r["frozen"]), fmt(r["cached"]),
                      fmt(r["finetune"]))
        Console(width=140).print(t)
    except ImportError:  # plain text
        print(title)
        print(f"{'backbone':22} {'px':>4} {'precision':20} {'frozen/step':>12} {'cached':>10} {'finetune':>10}")
        for r in rows:
            print(f"{r['backbone']:22} {r['size']:>4} {r['precision']:20} {fmt(r['frozen']):>12} "
                  f"{fmt(r['cached']):>10} {fmt(r['finetune']):>10}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbones", default=",".join(BACKBONES),
                    help=f"comma-separated registry names (default: all: {','.join(BACKBONES)})")
    ap.add_argument("--iters", type=int, default=3, help="timed iterations per measurement")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=None, help="input size (default: each backbone's own)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--precisions", default=",".join(PRECISIONS), help=f"subset of {','.join(PRECISIONS)}")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    precs = tuple(p for p in a.precisions.split(",") if p)
    unknown = [p for p in precs if p not in PRECISIONS]
    if unknown:
        ap.error(f"unknown precision(s) {unknown}; choose from {PRECISIONS}")
    rows = []
    for name in [b.strip() for b in a.backbones.split(",") if b.strip()]:
        if name not in BACKBONES and not name.startswith("timm:"):
            ap.error(f"unknown backbone {name!r}; registered: {sorted(BACKBONES)}")
        t0 = time.perf_counter()
        rows += bench_backbone(name, a.batch, a.size, a.iters, a.warmup, precs)
        print(f"  {name}: measured in {time.perf_counter() - t0:.0f} s", flush=True)
    cpu = platform.processor() or platform.machine()
    render(rows, f"images/s, batch {a.batch}, {a.iters} timed iters after {a.warmup} warm-up; torch "
                 f"{torch.__version__}, {torch.get_num_threads()} threads, {cpu}, native bf16: {cpu_bf16_native()}")


if __name__ == "__main__":
    main()
