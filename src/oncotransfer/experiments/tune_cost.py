"""What a tune trial will cost before it runs, so a search spends its budget on recipes that can finish.

A trial's time is mostly training: for a ``last:N`` recipe, each epoch runs the tail forward and backward on
every cached activation (training images x (views + 1)); for a frozen or pooled one, the head trains on cached
features in a moment and the backbone's one extraction dominates. ``PRIOR_MS`` holds those per-image costs as
measured on a 2-core laptop-class CPU; a study scales them by what its own finished trials took
(``machine_factor``), so the estimate follows the machine it runs on after one trial."""
from __future__ import annotations

from typing import Any

from oncotransfer.config import ExperimentConfig
from oncotransfer.search_config import SearchSpace

PRIOR_MS = {"efficientnet_lite0": (6.0, 4.0, 13.0), "efficientnet_lite1": (10.0, 6.0, 20.0),
            "efficientnet_lite2": (16.0, 9.0, 30.0)}
"""Per backbone at 224 px, milliseconds: (one image's frozen feature extraction, one training image-view-epoch
of a last:1 tail, of a last:2 tail). Measured on the project's 2-core CPU (a 40-epoch Lite1 last:1 trial with
3 views took 6-11 minutes over 3 inner folds); other backbones count as Lite2."""
HEAD_MS = 0.05
"""A head's training step per image-view-epoch on cached features."""


def estimate_s(params: dict[str, Any], train_rows: int, folds: int) -> float:
    """Seconds for ``folds`` fits of a recipe on ``train_rows`` training images each (before the machine factor)."""
    extract, last1, last2 = PRIOR_MS.get(params["backbone"], PRIOR_MS["efficientnet_lite2"])
    scale = (int(params["image_size"]) / 224) ** 2
    views = int(params["views"]) + 1
    freeze = str(params["freeze"])
    if freeze.startswith("last:"):
        per_step = last1 if freeze == "last:1" else last2 * (int(freeze[5:]) / 2)
        per_fit = train_rows * views * (extract * 0.6 + int(params["epochs"]) * per_step * scale)
    else:  # frozen, pool:K: the extraction of every view once, then the head
        per_fit = train_rows * views * (extract * scale + int(params["epochs"]) * HEAD_MS)
    return folds * per_fit / 1000


def family(params: dict[str, Any]) -> str:
    """``tail`` (a last:N recipe: training dominates) or ``features`` (frozen or pooled: extraction, then cached)."""
    return "tail" if str(params["freeze"]).startswith("last:") else "features"


def machine_factor(trials, kind: str | None = None) -> float:
    """How much slower (> 1) or faster this machine ran the finished trials than ``estimate_s`` said: the median
    ratio over the trials of the same ``family``, kept within [0.25, 4]. Before one of that family finished, the
    other family can only make it slower: cached-feature trials run far under their estimate once the features
    exist (the estimate counts an extraction the cache saves), which says nothing about training a tail."""
    timed = [t for t in trials if t.user_attrs.get("seconds") and t.user_attrs.get("estimate_s")]
    same = [t for t in timed if t.user_attrs.get("family") == kind]
    ratios = sorted(t.user_attrs["seconds"] / t.user_attrs["estimate_s"] for t in (same or timed))
    if not ratios:
        return 1.0
    median = min(4.0, max(0.25, ratios[len(ratios) // 2]))
    return median if same or kind is None else max(1.0, median)


def base_params(base: ExperimentConfig, space: SearchSpace, defaults: dict[str, Any]) -> dict[str, Any]:
    """The base config's own recipe as a point of the space (each value moved to the nearest choice, the cheaper
    one on a tie), for the first trial of every search: the recipe the user wrote is always among those tried."""
    params: dict[str, Any] = {}
    for key in ("backbone", "freeze", "image_size", "views", "epochs", "schedule", "label_smoothing", "head_width"):
        options, value = list(getattr(space, key)), defaults[key]
        if len(options) == 1:
            continue  # fixed, not searched
        if value in options:
            params[key] = value
        elif isinstance(value, (int, float)) and all(isinstance(o, (int, float)) for o in options):
            params[key] = min(options, key=lambda o: (abs(o - value), o))
        else:
            params[key] = options[0]
    low, high = space.lr
    if low < high:
        params["lr"] = min(max(float(defaults["lr"]), low), high)
    return params
