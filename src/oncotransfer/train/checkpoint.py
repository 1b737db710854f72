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


def load_classifier(run_dir: str | Path):
    """Rebuild the classifier a run saved, from its own description; no pretrained download needed."""
    from oncotransfer.config import HeadConfig
    from oncotransfer.models.backbones import get_backbone, with_normalisation
    from oncotransfer.models.classifier import Classifier
    from oncotransfer.models.heads import create_head
    from oncotransfer.models.weights import WeightsInfo, build_backbone
    state, meta = read_checkpoint(run_dir)
    pre = meta["preprocessing"]
    spec = with_normalisation(get_backbone(meta["backbone"]["name"]), pre["mean"], pre["std"])
    from oncotransfer.models.classifier import feature_width
    backbone, _ = build_backbone(spec, "none")
    pool = int(((meta.get("config") or {}).get("model") or {}).get("pool_stages") or 1)
    head = create_head(HeadConfig(**meta["head"]), feature_width(backbone, pool), len(meta["classes"]))
    w = meta.get("weights") or {}
    info = WeightsInfo(w.get("source", "checkpoint"), w.get("digest", ""), tuple(pre["mean"]), tuple(pre["std"]))
    model = Classifier(backbone, head, spec, int(pre["size"]), info, freeze=meta.get("freeze", "frozen"),
                       pool_stages=pool)
    model.load_state_dict(state, strict=True)
    return model.eval(), meta


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
