"""Self-describing checkpoints (safetensors + JSON, no pickle): write and read ``checkpoint/``.

Rebuilding a classifier from them is ``models.factory.load_classifier``."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from oncotransfer import __version__
from oncotransfer.errors import CheckpointError
from oncotransfer.io import atomic_save_tensors
from oncotransfer.rundir import read_checkpoint_meta, write_checkpoint_meta


def checkpoint_meta(model, classes: list[str], head_cfg: dict, config: dict, extra: dict | None = None) -> dict:
    spec = model.spec
    return {"format": "oncotransfer-checkpoint/1", "version": __version__, "classes": list(classes),
            "backbone": {"name": spec.name, "timm_name": spec.timm_name, "gradcam_layer": spec.gradcam_layer,
                         "num_features": model.num_features},
            "head": head_cfg, "freeze": model.freeze,
            "weights": {"source": model.weights.source, "digest": model.weights.digest} if model.weights else None,
            "preprocessing": model.preprocessing(), "config": config, **(extra or {})}


def write_checkpoint(run_dir: Path, model, meta: dict) -> Path:
    """Write ``checkpoint/model.safetensors`` and ``checkpoint/meta.json`` atomically."""
    out = Path(run_dir) / "checkpoint"
    atomic_save_tensors(model.state_dict(), out / "model.safetensors", {"format": meta["format"]})
    write_checkpoint_meta(out, meta)
    return out


def read_checkpoint(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoint" if (run_dir / "checkpoint").is_dir() else run_dir
    if not (ckpt / "meta.json").is_file() or not (ckpt / "model.safetensors").is_file():
        raise CheckpointError(f"{run_dir}: no checkpoint (checkpoint/model.safetensors + meta.json); "
                              "give a run directory written by `oncotransfer train`")
    meta = read_checkpoint_meta(ckpt).content()
    return load_file(str(ckpt / "model.safetensors")), meta


def checkpoint_dir(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    return run_dir / "checkpoint" if (run_dir / "checkpoint").is_dir() else run_dir


def fold_entries(meta: dict) -> list[dict]:
    """``[{"fold", "file", "temperature"}]`` for every fold model a checkpoint holds; a checkpoint written
    before per-fold models (or temperatures) holds fold 0 alone, uncalibrated."""
    if meta.get("folds"):
        return [dict(e) for e in meta["folds"]]
    return [{"fold": int(meta.get("fold") or 0), "file": "model.safetensors", "temperature": meta.get("temperature")}]


def fold_entry(run_dir: Path, meta: dict, fold: int) -> dict:
    entries = fold_entries(meta)
    for e in entries:
        if int(e["fold"]) == int(fold):
            return e
    raise CheckpointError(f"{run_dir}: --fold {fold}: the checkpoint holds fold(s) "
                          f"{', '.join(str(e['fold']) for e in entries)}")


def fold_tensors(run_dir: Path, entry: dict) -> dict[str, torch.Tensor]:
    if entry["file"] == "model.safetensors":
        return {}
    path = checkpoint_dir(run_dir) / entry["file"]
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: fold {entry['fold']}'s model {entry['file']} is missing from the "
                              "checkpoint; copy the whole run directory (checkpoint/folds/ too)")
    return load_file(str(path))
