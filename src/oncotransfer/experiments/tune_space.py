"""A trial's recipe: sampled from ``search.space`` and laid over the base run config."""
from __future__ import annotations

from typing import Any

import yaml

from oncotransfer.config import ExperimentConfig, to_dict, with_updates
from oncotransfer.search_config import SearchSpace
from oncotransfer.weight_sources import PACKAGED, NAMED


def sample(trial, space: SearchSpace) -> dict[str, Any]:
    """One recipe; a choice with a single option is fixed, not searched (it stays out of the importances)."""
    params: dict[str, Any] = {}
    for key in ("backbone", "freeze", "image_size", "views", "epochs", "schedule", "label_smoothing", "head_width"):
        options = getattr(space, key)
        params[key] = trial.suggest_categorical(key, options) if len(options) > 1 else options[0]
    low, high = space.lr
    params["lr"] = trial.suggest_float("lr", low, high, log=True) if low < high else low
    return params


def _weights(base: ExperimentConfig, backbone: str) -> str:
    """Lite0/1/2 from their packaged ImageNet weights (offline); another backbone from the base's source, unless
    that is a packaged source for a different backbone."""
    if backbone in PACKAGED:
        return f"{backbone}_packaged"
    return "imagenet" if base.model.weights in NAMED["packaged"] else base.model.weights


def recipe_config(base: ExperimentConfig, params: dict[str, Any]) -> ExperimentConfig:
    """The run config of a recipe; keys the space does not name keep the base's values."""
    p = {**defaults(base), **params}
    freeze, pool = p["freeze"], 1
    if freeze.startswith("pool:"):
        freeze, pool = "frozen", int(freeze[5:])
    updates: dict[str, Any] = {
        "model.backbone": p["backbone"], "model.weights": _weights(base, p["backbone"]),
        "model.freeze": freeze, "model.pool_stages": pool,
        # width 0: a linear head (paper_dense would read no hidden layer as its default 100 units)
        "model.head.kind": "linear" if not p["head_width"] else ("mlp" if base.model.head.kind == "linear"
                                                                   else base.model.head.kind),
        "model.head.hidden": [int(p["head_width"])] if p["head_width"] else [],
        "data.image_size": int(p["image_size"]), "train.epochs": int(p["epochs"]), "train.lr": float(p["lr"]),
        "train.schedule": p["schedule"], "train.label_smoothing": float(p["label_smoothing"]),
    }
    views = int(p["views"])
    if views:
        aug = base.augment
        updates.update({"augment.mode": "offline", "augment.copies": views})
        if not (aug.rotation > 0 or aug.hflip or aug.vflip or aug.zoom > 0):  # copies need something to vary
            updates.update({"augment.rotation": 20, "augment.hflip": True, "augment.zoom": 0.1})
    else:
        updates["augment.mode"] = "none"
    return with_updates(base, updates)


def defaults(base: ExperimentConfig) -> dict[str, Any]:
    """What a recipe that names no value for a key keeps: the base config's own choice."""
    m, t = base.model, base.train
    freeze = f"pool:{m.pool_stages}" if m.freeze == "frozen" and m.pool_stages > 1 else m.freeze
    return {"backbone": m.backbone, "freeze": freeze, "image_size": base.data.image_size or 224,
            "views": base.augment.copies if base.augment.mode != "none" else 0, "epochs": t.epochs, "lr": t.lr,
            "schedule": t.schedule, "label_smoothing": t.label_smoothing,
            "head_width": 0 if m.head.kind == "linear" else (m.head.hidden or [100])[0]}


def recipe_yaml(cfg: ExperimentConfig, params: dict[str, Any]) -> str:
    """The chosen recipe as a config ``oncotransfer train`` runs, the searched values noted on top."""
    head = "".join(f"# {k}: {v}\n" for k, v in sorted(params.items()))
    return "# chosen by oncotransfer tune\n" + head + yaml.safe_dump(to_dict(cfg), sort_keys=False)
