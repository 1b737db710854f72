"""One run directory from the runs of several recipes trained with one split on the same images: its model is the
mean of all their fold models (``models.recipes``). ``oncotransfer tune`` makes its ensemble of top trials so.

The merged run is recipe 0's run directory with the other recipes' checkpoints in ``checkpoint/recipes/R/``. Its
held-out predictions are, image by image, the mean of the recipes' predictions of that image (each by its own
fold model that did not train on it), so metrics, calibration, the report and the referral cut describe the
ensemble that ``predict``, ``evaluate``, ``export`` and ``serve`` load."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from oncotransfer.errors import ConfigError
from oncotransfer.io import atomic_to_csv, sha256_file
from oncotransfer.models.checkpoint import read_meta
from oncotransfer.models.recipes import check_same_input
from oncotransfer.rundir import (mark_unfinished, read_checkpoint_meta, read_ood_meta, read_run_info,
                                 run_finished, write_checkpoint_meta, write_ood_meta, write_run_info)
from oncotransfer.runtables import read_predictions

KEY = ["fold", "path", "label"]


def merge_runs(out_dir: str | Path, runs: list[str | Path], described: list[dict[str, Any]]) -> Path:
    """Write the merged run of ``runs`` (recipe 0 first) to ``out_dir`` (replaced); ``described``: one dict per
    run (e.g. its trial, parameters and inner score), kept in meta.json and run.json. ``metrics.json`` is
    written last, so a merge cut short leaves an unfinished run (``rundir.run_finished``)."""
    runs, out = [Path(r) for r in runs], Path(out_dir)
    if len(runs) < 2 or len(described) != len(runs):
        raise ValueError("merge_runs needs two runs or more and one description per run")
    classes = _check(runs)
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(runs[0], out, ignore=shutil.ignore_patterns("export", "state"))
    mark_unfinished(out)
    ckpt = out / "checkpoint"
    for r, run in enumerate(runs[1:], start=1):
        shutil.copytree(run / "checkpoint", ckpt / "recipes" / str(r), ignore=shutil.ignore_patterns("export"))
    meta = read_checkpoint_meta(ckpt).content()
    meta["recipe"] = described[0]
    meta["recipes"] = [{"dir": f"recipes/{r}", "meta_sha256": sha256_file(ckpt / f"recipes/{r}/meta.json"),
                        "ood_sha256": (sha256_file(ckpt / f"recipes/{r}/ood.json")
                                       if (ckpt / f"recipes/{r}/ood.json").is_file() else None), **described[r]}
                       for r in range(1, len(runs))]
    write_checkpoint_meta(ckpt, meta)
    merged = _mean_predictions([read_predictions(run / "predictions.csv", classes) for run in runs], runs, classes)
    atomic_to_csv(merged, out / "predictions.csv", index=False)
    ood = read_ood_meta(ckpt)
    if ood is not None:  # the referral cut: the ensemble's own confidences, on images no member trained on
        cal = [f"cal_prob_{c}" if f"cal_prob_{c}" in merged.columns else f"prob_{c}" for c in classes]
        write_ood_meta(ckpt, {**ood.content(), "confidences": sorted(merged[cal].max(axis=1).astype(float))})
    info = read_run_info(out).content()
    names = ", ".join(_name(d, r) for r, d in enumerate(described))
    info["protocol"] = {**(info.get("protocol") or {}),
                        "recipes": f"the mean of {len(runs)} recipes' fold models ({names})"}
    info["recipes"] = [{"run": str(run), **d} for run, d in zip(runs, described)]
    info["checkpoint"] = f"{len(runs)} recipes: recipe 0 in checkpoint/, the others in checkpoint/recipes/"
    info["seconds"] = sum(float(read_run_info(run).content().get("seconds") or 0) for run in runs)
    write_run_info(out, info)
    from oncotransfer.evaluate.report import evaluate_run
    evaluate_run(out)
    return out


def _name(d: dict[str, Any], r: int) -> str:
    return f"trial {d['trial']}" if "trial" in d else f"recipe {r}"


def _check(runs: list[Path]) -> list[str]:
    """The classes of ``runs``, once they are shown to be finished runs of one split and one input."""
    for run in runs:
        if not run_finished(run):
            raise ConfigError(f"{run}: not a finished run (no metrics.json); train it first")
    split = (runs[0] / "split.csv").read_bytes()
    metas = [read_meta(run) for run in runs]
    for run, meta in zip(runs, metas):
        if meta.get("recipes"):
            raise ConfigError(f"{run}: already an ensemble of recipes; merge the runs it was made of instead")
    for run, meta in zip(runs[1:], metas[1:]):
        if (run / "split.csv").read_bytes() != split:
            raise ConfigError(f"{run}: its split.csv differs from {runs[0]}'s; the recipes of an ensemble are "
                              "trained with one split on the same images")
        check_same_input(metas[0], meta, run)
    return list(metas[0]["classes"])


def _mean_predictions(frames: list[pd.DataFrame], runs: list[Path], classes: list[str]) -> pd.DataFrame:
    """Row by row the recipes' mean (probabilities, calibrated ones, OOD scores); ``in_distribution`` against the
    mean of the fold's members' thresholds, as ``models.ood.OODScorer`` decides for them."""
    for run, f in zip(runs[1:], frames[1:]):
        if list(f.columns) != list(frames[0].columns) or not f[KEY].equals(frames[0][KEY]):
            raise ConfigError(f"{run}/predictions.csv: not the rows of {runs[0]}/predictions.csv (fold, path, "
                              "label in order); the runs were not trained with one split on the same images")
    out = frames[0].copy()
    prob = [f"prob_{c}" for c in classes]
    out[prob] = np.mean([f[prob].to_numpy(float) for f in frames], axis=0)
    cal = [f"cal_prob_{c}" for c in classes]
    if all(c in out.columns for c in cal):  # a fold without a temperature: its plain probabilities
        out[cal] = np.mean([f[cal].fillna(f[prob].set_axis(cal, axis=1)).to_numpy(float) for f in frames], axis=0)
    out["pred"] = [classes[k] for k in out[prob].to_numpy().argmax(1)]
    if "ood_score" in out.columns:
        out["ood_score"] = np.mean([pd.to_numeric(f["ood_score"]).to_numpy(float) for f in frames], axis=0)
        thresholds = _fold_thresholds(runs)
        out["in_distribution"] = [None if thresholds.get(int(k)) is None else bool(s <= thresholds[int(k)])
                                  for k, s in zip(out["fold"], out["ood_score"])]
    return out


def _fold_thresholds(runs: list[Path]) -> dict[int, float | None]:
    """Fold -> the mean of the recipes' thresholds for that fold (None where some recipe has none)."""
    by_fold: dict[int, list[float | None]] = {}
    for run in runs:
        ood = read_ood_meta(run / "checkpoint")
        for m in (ood.members if ood is not None else []):
            by_fold.setdefault(m.fold, []).append(m.threshold)
    return {k: None if len(v) < len(runs) or any(t is None for t in v) else float(np.mean(v))
            for k, v in by_fold.items()}
