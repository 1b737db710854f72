"""ONNX Runtime feature extraction against this CPU's fp32 roofline: Lite0 against MobileNetV2, per setting.

    HF_HUB_OFFLINE=1 python benchmarks/ort_roofline.py [--rounds 5] [--batch 32] [--skip-int8]

Both backbones (224 px, pooled features, as ``train.features`` exports them) run in ONNX Runtime under the
settings that could move them toward the SGEMM peak that ``roofline.py`` measures: graph optimisation level
(ALL, which includes the NCHWc layout transformer, against EXTENDED, which does not), intra-op threads (1 and
2, each against the SGEMM peak on as many threads), batch size, and thread spinning. Settings are interleaved
round by round and the fastest round is kept (the machine is shared, so slower rounds measure other jobs).
Then ORT's own profiler (``SessionOptions.enable_profiling``) splits the default session's time per op type,
and the frozen Lite0 is quantised to int8 (dynamic, and static QDQ per channel calibrated on random
images: the speed does not depend on what the calibration images show) to see if int8 is worth offering.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from roofline import backbone_gflop, sgemm_peak_gflops  # noqa: E402

MODELS = ("efficientnet_lite0", "mobilenet_v2")


def export(name: str, path: Path, traced_pads: bool = False) -> Path:
    """The backbone as ``train.features`` exports it; ``traced_pads``: as it was exported before
    ``runtime.static_same_padding`` (a Pad computed at run time before each TF-"same" convolution)."""
    import contextlib
    from unittest import mock

    from oncotransfer import runtime
    from oncotransfer.config import HeadConfig
    from oncotransfer.models.factory import create_classifier
    net = create_classifier(name, "none", HeadConfig(), 2, "frozen", 224).backbone.eval()
    off = mock.patch.object(runtime, "static_same_padding", lambda m, s: contextlib.nullcontext())
    with off if traced_pads else contextlib.nullcontext():
        return runtime.export_onnx(net, path, 224)


def session(path: Path, level: str = "ALL", threads: int = 2, spin: bool = True, profile: str | None = None):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_ENABLE_{level}")
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def op_times(path: Path, x: np.ndarray, tmp: Path, runs: int = 3) -> dict[str, float]:
    """ms per batch spent in each op type (ORT profiler, mean of ``runs`` after a warm-up)."""
    s = session(path, profile=str(tmp / f"prof_{path.stem}"))
    feed = {s.get_inputs()[0].name: x}
    for _ in range(runs + 1):
        s.run(None, feed)
    events = json.loads(Path(s.end_profiling()).read_text())
    per_op: dict[str, float] = collections.defaultdict(float)
    run_starts = [e["ts"] for e in events if e.get("name") == "model_run"]
    first = sorted(run_starts)[1] if len(run_starts) > 1 else 0  # the warm-up run is not counted
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= first:
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / runs
    return dict(per_op)


def describe_convs(path: Path) -> dict[str, int]:
    """Conv nodes of the exported graph by kind: depthwise (group == channels), 1x1, other."""
    import onnx
    g = onnx.load(str(path)).graph
    init = {i.name: i for i in g.initializer}
    kinds: dict[str, int] = collections.Counter()
    for n in g.node:
        if n.op_type != "Conv":
            continue
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        w = init.get(n.input[1])
        k = tuple(w.dims[2:]) if w is not None else ()
        kinds["depthwise" if group > 1 else ("1x1" if k == (1, 1) else "dense kxk")] += 1
    return dict(kinds)


def quantised(path: Path, tmp: Path, batch: int) -> dict[str, Path]:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    pre = tmp / f"{path.stem}_pre.onnx"
    quant_pre_process(str(path), str(pre))
    dyn, stat = tmp / f"{path.stem}_dyn.onnx", tmp / f"{path.stem}_static.onnx"
    quantize_dynamic(str(pre), str(dyn), weight_type=QuantType.QUInt8)

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.it = iter([{"input": rng.normal(0, 1, (batch, 3, 224, 224)).astype(np.float32)} for _ in range(2)])

        def get_next(self):
            return next(self.it, None)
    quantize_static(str(pre), str(stat), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return {"int8 dynamic": dyn, "int8 static QDQ per-channel": stat}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--skip-int8", action="store_true")
    args = ap.parse_args()
    import onnxruntime as ort
    bs = args.batch
    x = np.random.default_rng(0).normal(0, 1, (bs, 3, 224, 224)).astype(np.float32)
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        paths = {m: export(m, tmp / f"{m}.onnx") for m in MODELS}
        gflop = {m: backbone_gflop(m) for m in MODELS}
        settings = [("ALL (NCHWc), 2 threads", dict(), bs), ("EXTENDED (no NCHWc), 2 threads", dict(level="EXTENDED"), bs),
                    ("ALL, 2 threads, no spinning", dict(spin=False), bs), ("ALL, 1 thread", dict(threads=1), bs),
                    (f"ALL, 2 threads, batch {max(bs // 4, 1)}", dict(), max(bs // 4, 1))]
        cases = {(m, label): (session(paths[m], **kw), n) for m in MODELS for label, kw, n in settings}
        before = export("efficientnet_lite0", tmp / "lite0_traced_pads.onnx", traced_pads=True)
        cases[("efficientnet_lite0", "ALL, 2 threads, run-time Pads (export before this change)")] = (session(before), bs)
        if not args.skip_int8:
            for label, q in quantised(paths["efficientnet_lite0"], tmp, bs).items():
                cases[("efficientnet_lite0", label + ", ALL, 2 threads")] = (session(q), bs)
        best: dict = {k: float("inf") for k in cases}
        for s, n in cases.values():
            s.run(None, {"input": x[:n]})  # warm-up
        peaks = {1: 0.0, 2: 0.0}
        for _ in range(args.rounds):
            for th in peaks:  # the peak is measured in the same rounds, so load hits both alike
                peaks[th] = max(peaks[th], sgemm_peak_gflops(th, repeats=3))
            for key, (s, n) in cases.items():
                t0 = time.perf_counter()
                s.run(None, {"input": x[:n]})
                best[key] = min(best[key], (time.perf_counter() - t0) / n)
        print(f"onnxruntime {ort.__version__}; SGEMM peak {peaks[2]:.1f} GFLOP/s on 2 threads, {peaks[1]:.1f} on 1; "
              f"224 px; fastest of {args.rounds} interleaved rounds")
        print("\n| backbone | setting | GFLOP/image | images/s | GFLOP/s | % of fp32 roofline (same threads) |")
        print("|---|---|---:|---:|---:|---:|")
        for (m, label), s_per_img in best.items():
            rate = gflop[m] / s_per_img
            th = 1 if "1 thread" in label else 2
            print(f"| {m} | {label} | {gflop[m]:.3f} | {1 / s_per_img:.1f} | {rate:.1f} | {rate / peaks[th]:.0%} |")

        print("\nTime per op type, default session (ALL, 2 threads), ms per batch of", bs)
        times = {m: op_times(paths[m], x, tmp) for m in MODELS}
        times["lite0, run-time Pads (before)"] = op_times(before, x, tmp)
        ops = sorted(set().union(*times.values()), key=lambda o: -max(t.get(o, 0) for t in times.values()))
        print("\n| op type | " + " | ".join(f"{m} ms (share)" for m in times) + " |")
        print("|---|" + "---:|" * len(times))
        for o in ops[:10]:
            cells = [f"{times[m].get(o, 0):.1f} ({times[m].get(o, 0) / sum(times[m].values()):.0%})" for m in times]
            print(f"| {o} | " + " | ".join(cells) + " |")
        print("\nConv nodes by kind (the default export): " + "; ".join(f"{m}: {describe_convs(paths[m])}" for m in MODELS))


if __name__ == "__main__":
    main()
