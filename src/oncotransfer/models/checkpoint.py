"""Self-describing checkpoints (safetensors + JSON, no pickle): write and read ``checkpoint/``.

``meta.json`` records the sha256 and size of every model file it names (``folds``); reading checks them, so a
fold file cut short, damaged, or replaced by another fold's (an ensemble holding one model twice) is refused in
one line naming the file. Rebuilding a classifier from them is ``models.factory.load_classifier``."""
from __future__ import annotations

from pathlib import Path

import torch

from oncotransfer import __version__
from oncotransfer.errors import CheckpointError
from oncotransfer.io import atomic_save_tensors
from oncotransfer.rundir import (file_digest, read_checkpoint_meta, safetensors_metadata, tensors_from_bytes,
                                 verified_bytes, write_checkpoint_meta)

RETRAIN = "retrain the run (oncotransfer train CONFIG), or copy the whole run directory again"


def checkpoint_meta(model, classes: list[str], head_cfg: dict, config: dict, extra: dict | None = None) -> dict:
    spec = model.spec
    return {"format": "oncotransfer-checkpoint/1", "version": __version__, "classes": list(classes),
            "backbone": {"name": spec.name, "timm_name": spec.timm_name, "gradcam_layer": spec.gradcam_layer,
                         "num_features": model.num_features},
            "head": head_cfg, "freeze": model.freeze,
            "weights": {"source": model.weights.source, "digest": model.weights.digest} if model.weights else None,
            "preprocessing": model.preprocessing(), "config": config, **(extra or {})}


def write_checkpoint(run_dir: Path, model, meta: dict) -> Path:
    """Write ``checkpoint/model.safetensors`` and ``checkpoint/meta.json`` atomically; every fold entry gets the
    digest of its file (fold files are written before, as each fold finishes)."""
    out = Path(run_dir) / "checkpoint"
    atomic_save_tensors(model.state_dict(), out / "model.safetensors", {"format": meta["format"]})
    meta = dict(meta)
    entries = meta.get("folds") or [{"fold": int(meta.get("fold") or 0), "file": "model.safetensors",
                                      "temperature": meta.get("temperature")}]
    meta["folds"] = [{**e, **file_digest(out / e["file"])} for e in entries]
    write_checkpoint_meta(out, meta)
    return out


def read_checkpoint(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    meta = read_meta(run_dir)
    ckpt = checkpoint_dir(Path(run_dir))
    return _load(ckpt, _entry_for(meta, "model.safetensors")), meta


def read_meta(run_dir: str | Path) -> dict:
    """The checkpoint's meta.json, validated, without reading its tensors."""
    run_dir = Path(run_dir)
    ckpt = checkpoint_dir(run_dir)
    if not (ckpt / "meta.json").is_file() or not (ckpt / "model.safetensors").is_file():
        raise CheckpointError(f"{run_dir}: no checkpoint (checkpoint/model.safetensors + meta.json); "
                              "give a run directory written by `oncotransfer train`")
    return read_checkpoint_meta(ckpt).content()


def _entry_for(meta: dict, file: str) -> dict:
    return next((e for e in meta.get("folds") or [] if e.get("file") == file), {"file": file})


def _load(ckpt: Path, entry: dict) -> dict[str, torch.Tensor]:
    """The tensors of ``entry``'s file, checked against the digest meta.json records for it."""
    path = ckpt / entry["file"]
    data = verified_bytes(path, {k: entry.get(k) for k in ("sha256", "bytes")}, "meta.json", RETRAIN)
    tensors = tensors_from_bytes(data, path, RETRAIN)
    # fold files name their fold (save_fold_tensors): catches another fold's file even without a digest
    held = safetensors_metadata(data).get("fold")
    if entry["file"] != "model.safetensors" and held is not None and held != str(entry.get("fold")):
        raise CheckpointError(f"{path}: holds fold {held}'s model, not fold {entry.get('fold')}'s (a fold file "
                              f"copied over another); {RETRAIN}")
    return tensors


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
    return _load(checkpoint_dir(run_dir), entry)
