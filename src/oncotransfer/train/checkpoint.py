"""Self-describing checkpoints (safetensors + JSON, no pickle) and resumable training state."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from oncotransfer import __version__
from oncotransfer.errors import CheckpointError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, default=str).encode())


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
    write_json(out / "meta.json", meta)
    return out


def read_checkpoint(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoint" if (run_dir / "checkpoint").is_dir() else run_dir
    if not (ckpt / "meta.json").is_file() or not (ckpt / "model.safetensors").is_file():
        raise CheckpointError(f"{run_dir}: no checkpoint (checkpoint/model.safetensors + meta.json); "
                              "give a run directory written by `oncotransfer train`")
    meta = json.loads((ckpt / "meta.json").read_text())
    return load_file(str(ckpt / "model.safetensors")), meta


def _checkpoint_dir(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    return run_dir / "checkpoint" if (run_dir / "checkpoint").is_dir() else run_dir


def fold_entries(meta: dict) -> list[dict]:
    """``[{"fold", "file", "temperature"}]`` for every fold model a checkpoint holds; a checkpoint written
    before per-fold models (or temperatures) holds fold 0 alone, uncalibrated."""
    if meta.get("folds"):
        return [dict(e) for e in meta["folds"]]
    return [{"fold": int(meta.get("fold") or 0), "file": "model.safetensors", "temperature": meta.get("temperature")}]


def _entry(run_dir: Path, meta: dict, fold: int) -> dict:
    entries = fold_entries(meta)
    for e in entries:
        if int(e["fold"]) == int(fold):
            return e
    raise CheckpointError(f"{run_dir}: --fold {fold}: the checkpoint holds fold(s) "
                          f"{', '.join(str(e['fold']) for e in entries)}")


def _fold_tensors(run_dir: Path, entry: dict) -> dict[str, torch.Tensor]:
    if entry["file"] == "model.safetensors":
        return {}
    path = _checkpoint_dir(run_dir) / entry["file"]
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: fold {entry['fold']}'s model {entry['file']} is missing from the "
                              "checkpoint; copy the whole run directory (checkpoint/folds/ too)")
    return load_file(str(path))


def _build(meta: dict, backbone=None):
    """An untrained classifier of the checkpoint's shape; ``backbone`` (a module) is used as it is if given."""
    from oncotransfer.config import HeadConfig
    from oncotransfer.models.backbones import get_backbone, with_normalisation
    from oncotransfer.models.classifier import Classifier
    from oncotransfer.models.heads import create_head
    from oncotransfer.models.weights import WeightsInfo, build_backbone
    pre = meta["preprocessing"]
    spec = with_normalisation(get_backbone(meta["backbone"]["name"]), pre["mean"], pre["std"])
    from oncotransfer.models.classifier import feature_width
    if backbone is None:
        backbone, _ = build_backbone(spec, "none")
    pool = int(((meta.get("config") or {}).get("model") or {}).get("pool_stages") or 1)
    head = create_head(HeadConfig(**meta["head"]), feature_width(backbone, pool), len(meta["classes"]))
    w = meta.get("weights") or {}
    info = WeightsInfo(w.get("source", "checkpoint"), w.get("digest", ""), tuple(pre["mean"]), tuple(pre["std"]))
    return Classifier(backbone, head, spec, int(pre["size"]), info, freeze=meta.get("freeze", "frozen"),
                      pool_stages=pool)


def load_classifier(run_dir: str | Path, fold: int = 0):
    """Rebuild the classifier a run saved, from its own description; no pretrained download needed.
    ``fold`` k > 0 is fold 0's state overlaid with the tensors of checkpoint/folds/fold{k}.safetensors.
    The returned meta's ``temperature`` is that fold's (None: uncalibrated)."""
    state, meta = read_checkpoint(run_dir)
    entry = _entry(Path(run_dir), meta, fold)
    model = _build(meta)
    model.load_state_dict({**state, **_fold_tensors(Path(run_dir), entry)}, strict=True)
    return model.eval(), {**meta, "fold": int(entry["fold"]), "temperature": entry.get("temperature")}


def load_members(run_dir: str | Path, fold: int | None = None):
    """``(members, entries, meta)``: every fold model of the run (``fold=None``) or fold ``fold`` alone.
    Members whose fold file holds no backbone tensors (frozen runs) share fold 0's backbone module object,
    so an ensemble computes the backbone once."""
    run_dir = Path(run_dir)
    state, meta = read_checkpoint(run_dir)
    entries = [_entry(run_dir, meta, fold)] if fold is not None else fold_entries(meta)
    shared = None
    members = []
    for e in entries:
        extra = _fold_tensors(run_dir, e)
        if shared is not None and not any(k.startswith("backbone.") for k in extra):
            model = _build(meta, backbone=shared)
            full = {**state, **extra}
            model.head.load_state_dict({k[5:]: v for k, v in full.items() if k.startswith("head.")}, strict=True)
        else:
            model = _build(meta)
            model.load_state_dict({**state, **extra}, strict=True)
            if shared is None and not any(k.startswith("backbone.") for k in extra):
                shared = model.backbone  # fold 0's own backbone, or one no fold file overrides
        members.append(model.eval())
    return members, entries, meta


def flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state -> (tensors, JSON) so resume state needs no pickle either."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for name, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{pid}.{name}"] = value
            elif value is not None:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], info: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for key, value in info["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})
