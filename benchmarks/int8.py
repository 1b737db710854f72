"""Int8 quantisation of a run's frozen prefix with ONNX Runtime: speed, accuracy and calibration on its own folds.

    HF_HUB_OFFLINE=1 PYTHONPATH=src python benchmarks/int8.py --run RUN [--data PATH] [--calibration 64]

RUN: a k-fold run whose base is frozen (``freeze: frozen``) or partly frozen (``last:N``), e.g. busi-dev's
``configs/busi_best.yaml``. For each fold model: its frozen prefix (``Classifier.tail_split``: the whole feature module of
a frozen run, blocks 0-4 of Lite0 for ``last:2``) is exported to ONNX and quantised by ONNX Runtime, dynamic
(weights int8) and static QDQ (weights per channel int8, activations uint8 calibrated (``--method``: MinMax, percentile or entropy) on ``--calibration``
of that fold's *training* images, never its validation ones). The fold's held-out (test) images then go through the
fp32 and the int8 prefixes, and from there through the same fp32 tail, head and temperature. Pooled over the folds
(each image scored once, by the model that did not train on it): accuracy, balanced accuracy, ROC AUC, ECE,
Brier score, agreement with fp32 and the largest probability change; and each prefix's images/s on the same
images in the same run (batches of 16, all cores).

Issue 21 offers int8 only if accuracy stays within 0.5 points of fp32.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def quantise(fp32: Path, out: Path, calibration: np.ndarray, method: str = "minmax") -> dict[str, Path]:
    """fp32 ONNX prefix -> {name: int8 model}: dynamic, and static QDQ calibrated on ``calibration`` (normalised)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    pre = out / "pre.onnx"
    quant_pre_process(str(fp32), str(pre))
    dyn, stat = out / "dynamic.onnx", out / "static.onnx"
    quantize_dynamic(str(pre), str(dyn), weight_type=QuantType.QUInt8)

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter({"input": calibration[s:s + 16]} for s in range(0, len(calibration), 16))

        def get_next(self):
            return next(self.it, None)
    quantize_static(str(pre), str(stat), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method={"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                                      "entropy": CalibrationMethod.Entropy}[method])
    return {"int8 dynamic": dyn, "int8 static QDQ": stat}


def ece(probs: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs((pred[m] == y[m]).mean() - conf[m].mean())
    return float(total)


def scores(probs: np.ndarray, y: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score
    onehot = np.eye(probs.shape[1])[y]
    auc = roc_auc_score(y, probs[:, 1]) if probs.shape[1] == 2 else roc_auc_score(y, probs, multi_class="ovr")
    return {"accuracy": accuracy_score(y, probs.argmax(1)), "balanced": balanced_accuracy_score(y, probs.argmax(1)),
            "auc": auc, "ece": ece(probs, y), "brier": float(((probs - onehot) ** 2).sum(1).mean()),
            "agree": float((probs.argmax(1) == ref.argmax(1)).mean()), "max_dp": float(np.abs(probs - ref).max())}


def rate(session, x: np.ndarray) -> float:
    from oncotransfer.runtime import run_session
    run_session(session, x[:16], 16)  # warm-up
    t = time.perf_counter()
    run_session(session, x, 16)
    return len(x) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=None, help="the run's data folder (default: its config's)")
    ap.add_argument("--calibration", type=int, default=64, help="training images per fold for static calibration")
    ap.add_argument("--method", choices=["minmax", "percentile", "entropy"], default="minmax",
                    help="how static quantisation sets activation ranges from the calibration images")
    a = ap.parse_args()

    import pandas as pd
    import torch

    from oncotransfer.data.images import decode_many
    from oncotransfer.infer.predict import Predictor
    from oncotransfer.runtime import export_onnx, ort_session, run_session

    pred = Predictor.from_run(a.run, "torch")
    cfg = pred.meta.get("config") or {}
    data = a.data or Path(cfg["data"]["path"])
    split = pd.read_csv(a.run / "split.csv")
    classes = pred.classes
    paths = sorted(set(split["path"]))  # a k-fold split lists each image once per fold
    images, ok, failed, _ = decode_many([str(data / p) for p in paths], pred.size, us_region=pred.us_region)
    if failed:
        sys.exit(f"{len(failed)} images of split.csv do not decode under {data}")
    where = {p: i for i, p in enumerate(paths)}
    x_all = pred.normalised(images).numpy()[[where[p] for p in split["path"]]]  # row order of split.csv
    y_all = np.array([classes.index(c) for c in split["label"]])
    tmp = Path(tempfile.mkdtemp(prefix="int8-"))
    variants = ["fp32", "int8 dynamic", "int8 static QDQ"]
    probs = {v: np.zeros((len(split), len(classes))) for v in variants}
    scored = np.zeros(len(split), bool)
    speed: dict[str, list[float]] = {v: [] for v in variants}
    cut_name = ""
    for k, (member, info) in enumerate(zip(pred.ensemble.members, pred.members)):
        fold = info["fold"]
        rows = split["fold"].to_numpy() == fold
        val = np.nonzero(rows & (split["subset"].to_numpy() == "test"))[0]  # the held-out fold: pooled metrics' images
        train = np.nonzero(rows & (split["subset"].to_numpy() == "train"))[0]
        if member.freeze == "frozen":  # the whole feature module (pooled stages included) is the prefix
            prefix, tail, cut_name = member.feature_module(), member.head, "head"
        else:
            prefix, tail, cut_name = member.tail_split()
        folder = tmp / f"fold{fold}"
        fp32 = export_onnx(prefix.eval(), folder / "fp32.onnx", pred.size)
        rng = np.random.default_rng(fold)
        calib = x_all[rng.choice(train, min(a.calibration, len(train)), replace=False)]
        models = {"fp32": fp32, **quantise(fp32, folder, calib, a.method)}
        temperature = info.get("temperature") or 1.0
        for v, path in models.items():
            session = ort_session(path)
            acts = run_session(session, x_all[val], 16)
            with torch.inference_mode():
                logits = tail.eval()(torch.from_numpy(acts)).float()
            probs[v][val] = torch.softmax(logits / temperature, 1).numpy()
            speed[v].append(rate(session, x_all[val]))
        scored[val] = True
    recorded = __import__("json").loads((a.run / "metrics.json").read_text())["pooled"]["accuracy"]
    y = y_all[scored]
    ref = probs["fp32"][scored]
    print(f"\n{a.run.name}: {int(scored.sum())} held-out images over {len(pred.members)} folds; prefix up to "
          f"{cut_name} ({pred.meta['backbone']['name']}, {pred.size} px); static calibration ({a.method}) on "
          f"{a.calibration} training images a fold; the run's own pooled accuracy: {recorded:.3f}\n")
    print("| prefix | images/s | speed-up | accuracy | balanced | ROC AUC | ECE | Brier | agrees with fp32 "
          "| largest prob. change |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = float(np.mean(speed["fp32"]))
    for v in variants:
        s = scores(probs[v][scored], y, ref)
        r = float(np.mean(speed[v]))
        print(f"| {v} | {r:.1f} | {r / base:.2f}x | {s['accuracy']:.3f} | {s['balanced']:.3f} | {s['auc']:.3f} "
              f"| {s['ece']:.3f} | {s['brier']:.3f} | {100 * s['agree']:.1f}% | {s['max_dp']:.3f} |")


if __name__ == "__main__":
    main()
