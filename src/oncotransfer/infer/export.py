"""Export a run's classifier (ONNX or TorchScript) with a JSON description, and check parity on real images."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from oncotransfer import __version__
from oncotransfer.errors import ConfigError, OncoError
from oncotransfer.runtables import read_text_table

PARITY_TOL = 1e-4


class ExportParityError(OncoError):
    """The exported model's probabilities differ from PyTorch's by more than the tolerance."""


class ProbabilityModel(nn.Module):
    """Normalised image batch -> (N, C) probabilities (a sigmoid head gives two columns too). ``model`` is a
    classifier, or an ``Ensemble`` (members' logits / their temperatures, probabilities averaged; a prefix the
    members share is traced once, so the graph holds one prefix and a tail per member). With an
    ``ood`` scorer (``models.ood.OODScorer``, ensembles only) the output is (probabilities, (N,) OOD scores)."""

    def __init__(self, model: nn.Module, temperature: float | None = None, ood: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.temperature = temperature
        self.ood = ood

    def forward(self, x: torch.Tensor):
        if hasattr(self.model, "member_outputs"):
            feats, logits = self.model.member_outputs(x)
            probs = self.model.average(logits)
            return probs if self.ood is None else (probs, self.ood(feats, logits))
        return self.model.head.probabilities(self.model(x), self.temperature)


def parity_images(run_dir: Path, meta: dict, size: int, limit: int = 8) -> torch.Tensor:
    """Up to ``limit`` of the run's own images (split.csv) resized uint8; the demo tiles if none are readable."""
    from oncotransfer.data.images import decode_many
    from oncotransfer.data.manifest import resolve_data_path
    paths: list[str] = []
    split = run_dir / "split.csv"
    data_path = ((meta.get("config") or {}).get("data") or {}).get("path")
    if split.is_file() and data_path:
        # a damaged split.csv is a damaged run: named in one line (CheckpointError), not swapped for demo tiles
        table = read_text_table(split, "copy the whole run directory again (split.csv too), or retrain the run")
        try:
            root = resolve_data_path(data_path)
            root = root.parent if root.is_file() else root
            rel = table["path"].astype(str).tolist()
            paths = [str(p if Path(p).is_absolute() else root / p) for p in rel]
            paths = [p for p in paths if Path(p).is_file()][:limit]
        except (OncoError, OSError, KeyError, pd.errors.ParserError):
            paths = []
    images = decode_many(paths, size)[0] if paths else torch.zeros((0, 3, size, size), dtype=torch.uint8)
    if len(images) == 0:
        from oncotransfer.data.demo import demo_path
        demo = sorted(p for p in demo_path("osteosarcoma").rglob("*.jpg"))[:limit]
        images = decode_many([str(p) for p in demo], size)[0]
    return images


def export_run(run_dir: str | Path, fmt: Literal["onnx", "torchscript"] = "onnx",
               log: Callable[[str], None] | None = None, fold: int | None = None,
               out_dir: str | Path | None = None) -> Path:
    """Write RUN/export/model.onnx (or model.ts) and model.json (into ``out_dir`` when given); raise if parity
    with PyTorch fails.
    A multi-fold run exports the ensemble of its fold models in one file (``fold``: that fold's model alone);
    temperatures are part of the exported graph, so its outputs are the calibrated probabilities."""
    from oncotransfer.data.images import normalise
    from oncotransfer.infer.export_cache import checkpoint_digest
    from oncotransfer.infer.predict import Predictor
    from oncotransfer.io import write_json
    from oncotransfer.rundir import file_digest
    say = log or (lambda s: None)
    if fmt not in ("onnx", "torchscript"):
        raise ConfigError(f"--format {fmt!r}: expected onnx or torchscript")
    run_dir = Path(run_dir)
    pred = Predictor.from_run(run_dir, "torch", fold)
    meta = pred.meta
    pre = meta["preprocessing"]
    size = int(pre["size"])
    wrapped = ProbabilityModel(pred.ensemble, ood=pred.ood).eval()
    if len(pred.members) > 1:  # the graph has this shape: one shared prefix, a tail per member
        say(f"ensemble: {pred.ensemble.sharing_line()}")
    names = ("output",) if pred.ood is None else ("output", "ood_score")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "export"
    x = normalise(parity_images(run_dir, meta, size), tuple(pre["mean"]), tuple(pre["std"]))
    with torch.inference_mode():
        refs = _as_list(wrapped(x))
    ref = refs[0]
    if fmt == "onnx":
        from oncotransfer.runtime import export_onnx, ort_session, run_session_outputs
        path = export_onnx(wrapped, out_dir / "model.onnx", size, outputs=names)
        gots = run_session_outputs(ort_session(path), x.numpy())
    else:
        path = out_dir / "model.ts"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # jit is deprecated upstream but still what the issue asks
            traced = torch.jit.trace(wrapped, torch.zeros(2, 3, size, size), check_trace=False)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(".model.ts.tmp")
            traced.save(str(tmp))
            tmp.replace(path)
            gots = _as_list(torch.jit.load(str(path))(x))
    diff = float(np.abs(gots[0] - ref).max()) if len(ref) else float("nan")
    say(f"parity on {len(ref)} real images: max abs probability difference {diff:.2e} (tolerance {PARITY_TOL:g})")
    if pred.ood is not None and len(ref):  # relative: a Mahalanobis score can be in the thousands
        ood_diff = float(np.max(np.abs(gots[1] - refs[1]) / np.maximum(1.0, np.abs(refs[1]))))
        say(f"parity of ood_score: max difference {ood_diff:.2e} (relative above 1; tolerance {PARITY_TOL:g})")
        diff = max(diff, ood_diff)
    if not diff <= PARITY_TOL:
        path.unlink(missing_ok=True)  # a model that disagrees with PyTorch must not be picked up by predict/serve
        raise ExportParityError(f"{path.name}: exported outputs differ from PyTorch by {diff:.2e} "
                                f"(> {PARITY_TOL:g}) on {len(ref)} images; the export was removed")
    write_json(out_dir / "model.json", {
        "format": fmt, "file": path.name, **file_digest(path), "oncotransfer_version": __version__,
        "classes": meta["classes"],
        "preprocessing": {**pre, "resize": pre.get("resize", "squash-bilinear-antialias"),
                          "note": "RGB, squash-resize to size x size, scale to [0, 1], (x - mean) / std"},
        "backbone": meta["backbone"], "checkpoint_digest": checkpoint_digest(run_dir),
        "model": pred.describe(), "members": pred.members, "temperature": pred.temperature,
        "shared_prefix": pred.ensemble.shared_prefix,
        "calibration": "logits / temperature before softmax (sigmoid), fitted on validation subsets only "
                       "(pooled over the folds or per fold: run.json 'calibration')"
                       if pred.ensemble.calibrated else "none (no temperature fitted)",
        "input": {"name": "input", "shape": ["batch", 3, size, size], "dtype": "float32", "layout": "NCHW"},
        "output": {"name": "output", "shape": ["batch", len(meta["classes"])],
                   "meaning": "class probabilities in the order of 'classes' (rows sum to 1)"
                              + ("; the mean of the members' probabilities" if len(pred.members) > 1 else "")},
        "parity": {"images": int(len(ref)), "max_abs_diff": diff, "tolerance": PARITY_TOL},
        "ood": None if pred.ood is None else {
            "output": "ood_score", "detector": pred.ood.kind, "threshold": pred.ood.threshold,
            "pass_rate": pred.ood.pass_rate, "tensors_sha256": pred.ood_meta.tensors_sha256,
            "meaning": "out-of-distribution score per image, higher = more unusual (the mean of the members' "
                       "scores); in distribution when at or under 'threshold'"}})
    return path


def _as_list(out) -> list:
    return [t.numpy() if hasattr(t, "numpy") else t for t in (out if isinstance(out, (tuple, list)) else [out])]
