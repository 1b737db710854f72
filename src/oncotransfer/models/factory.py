"""The one way to get a classifier: build one from names (``create_classifier``, ``classifier_for``) or rebuild
the one a run saved (``load_classifier``, ``load_members``)."""
from __future__ import annotations

from pathlib import Path

import torch

from pydantic import ValidationError

from oncotransfer.config import HeadConfig, ModelConfig
from oncotransfer.errors import CheckpointError, ConfigError
from oncotransfer.models.backbones import get_backbone, with_normalisation
from oncotransfer.models.checkpoint import (RETRAIN, checkpoint_dir, fold_entry, fold_entries, fold_tensors,
                                            read_checkpoint, read_meta)
from oncotransfer.models.classifier import Classifier, apply_freeze, feature_width
from oncotransfer.models.heads import create_head
from oncotransfer.models.recipes import check_same_input, recipe_folders, with_recipe
from oncotransfer.models.tail import adopt_stages, common_prefix, cut_index, stage_chain
from oncotransfer.models.weights import WeightsInfo, build_backbone
from oncotransfer.weight_sources import parse_weights


def create_classifier(backbone: str, weights: str, head: HeadConfig, num_classes: int,
                      freeze: str = "frozen", image_size: int | None = None, pool_stages: int = 1) -> Classifier:
    """Build a classifier; the normalisation comes from the weights, not from a hard-coded ImageNet mean."""
    spec = get_backbone(backbone)
    net, info = build_backbone(spec, weights)
    spec = with_normalisation(spec, info.mean, info.std)
    head_module = create_head(head, feature_width(net, pool_stages), num_classes)
    return Classifier(net, head_module, spec, image_size or spec.input_size, info, freeze, pool_stages)


_FROZEN: dict[tuple, tuple] = {}
"""(backbone, weights, seed) -> (backbone module, weights info, RNG state after building it), for frozen bases."""


def classifier_for(mc: ModelConfig, num_classes: int, image_size: int | None, seed: int) -> Classifier:
    """``create_classifier`` from a config, but a frozen backbone is built once per process and seed (grids run
    hundreds of runs; loading weights cost ~1.3 s a run). It never trains, so sharing it is safe, and restoring
    the RNG state that building it left gives the head exactly the initialisation a fresh build would. The
    caller seeds torch with ``seed`` first."""
    if mc.freeze != "frozen":
        return create_classifier(mc.backbone, mc.weights, mc.head, num_classes, mc.freeze, image_size,
                                 mc.pool_stages)
    key = (mc.backbone, mc.weights, seed, _stamp(mc.weights))
    if key in _FROZEN:
        net, info, rng = _FROZEN[key]
        torch.set_rng_state(rng)
    else:
        net, info = build_backbone(get_backbone(mc.backbone), mc.weights)
        if len(_FROZEN) >= 8:  # bounded: a ResNet50 is ~100 MB
            _FROZEN.pop(next(iter(_FROZEN)))
        _FROZEN[key] = (net, info, torch.get_rng_state())
    spec = with_normalisation(get_backbone(mc.backbone), info.mean, info.std)
    head = create_head(mc.head, feature_width(net, mc.pool_stages), num_classes)
    return Classifier(net, head, spec, image_size or spec.input_size, info, mc.freeze, mc.pool_stages)


def _stamp(weights: str) -> int | None:
    """Modification time of a file:/run: weights source, so a rewritten file is never served from the memo."""
    path = parse_weights(weights).stamp_file
    return path.stat().st_mtime_ns if path is not None and path.exists() else None


def _described(meta: dict):
    """(backbone spec, head config) that meta.json describes; a one-line CheckpointError when it cannot be built."""
    pre = meta["preprocessing"]
    try:
        known = get_backbone(meta["backbone"]["name"])
    except ConfigError as e:  # the run's own file names it: say which file, not only the registry
        raise CheckpointError(f"checkpoint/meta.json: its backbone is not one this installation knows ({e}); "
                              "the run comes from another version or the file is damaged: retrain it") from None
    try:
        head_cfg = HeadConfig(**(meta.get("head") or {}))
    except (ValidationError, TypeError) as e:
        raise CheckpointError(f"meta.json: head: {str(e).splitlines()[-1].strip()[:100]}; the file is damaged or "
                              f"was edited by hand: {RETRAIN}") from None
    return with_normalisation(known, pre["mean"], pre["std"]), head_cfg


def member_plan(run_dir: str | Path, fold: int | None = None) -> tuple[list[dict], dict]:
    """``(entries, meta)`` of the fold models ``load_members`` builds, checked as it checks meta.json but without
    reading tensors or building modules: ONNX Runtime scores from the run's export, so the PyTorch members
    (about 0.25 s each for Lite0) wait until something asks for them."""
    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    _described(meta)
    entries = [fold_entry(run_dir, meta, fold)] if fold is not None else fold_entries(meta)
    for r, folder in enumerate(recipe_folders(run_dir, meta), start=1):  # an ensemble of recipes
        other = read_meta(folder)
        _described(other)
        check_same_input(meta, other, folder)
        entries += with_recipe([fold_entry(folder, other, fold)] if fold is not None else fold_entries(other), r)
    return entries, meta


def _build(meta: dict, backbone=None):
    """An untrained classifier of the checkpoint's shape; ``backbone`` (a module) is used as it is if given."""
    pre = meta["preprocessing"]
    spec, head_cfg = _described(meta)
    if backbone is None:
        backbone, _ = build_backbone(spec, "none")
    pool = int(((meta.get("config") or {}).get("model") or {}).get("pool_stages") or 1)
    head = create_head(head_cfg, feature_width(backbone, pool), len(meta["classes"]))
    w = meta.get("weights") or {}
    info = WeightsInfo(w.get("source", "checkpoint"), w.get("digest", ""), tuple(pre["mean"]), tuple(pre["std"]))
    return Classifier(backbone, head, spec, int(pre["size"]), info, freeze=meta.get("freeze", "frozen"),
                      pool_stages=pool)


def load_classifier(run_dir: str | Path, fold: int = 0):
    """Rebuild the classifier a run saved, from its own description; no pretrained download needed.
    ``fold`` k > 0 is fold 0's state overlaid with the tensors of checkpoint/folds/fold{k}.safetensors.
    The returned meta's ``temperature`` is that fold's (None: uncalibrated)."""
    state, meta = read_checkpoint(run_dir)
    entry = fold_entry(Path(run_dir), meta, fold)
    model = _build(meta)
    _fill(model, {**state, **fold_tensors(Path(run_dir), entry)}, Path(run_dir), entry)
    return model.eval(), {**meta, "fold": int(entry["fold"]), "temperature": entry.get("temperature")}


def load_members(run_dir: str | Path, fold: int | None = None):
    """``(members, entries, meta)``: every fold model of the run (``fold=None``) or fold ``fold`` alone; for an
    ensemble of recipes (``models.recipes``), those of every recipe, recipe 0's first."""
    members, entries, meta = _load_recipe(run_dir, fold)
    for r, folder in enumerate(recipe_folders(run_dir, meta), start=1):
        more, more_entries, other = _load_recipe(folder, fold)
        check_same_input(meta, other, folder)
        members += more
        entries += with_recipe(more_entries, r)
    return members, entries, meta


def _load_recipe(run_dir: str | Path, fold: int | None = None):
    """``load_members`` of one recipe's checkpoint. Members whose fold file holds no backbone tensors (frozen
    runs) share fold 0's backbone module object, so an ensemble computes the backbone once; the folds of a
    ``last:N`` run share fold 0's frozen stages (``_share_frozen_prefix``), so one copy of them is kept and an
    ensemble runs them once."""
    run_dir = Path(run_dir)
    state, meta = read_checkpoint(run_dir)
    entries = [fold_entry(run_dir, meta, fold)] if fold is not None else fold_entries(meta)
    shared = None
    members: list[Classifier] = []
    for e in entries:
        extra = fold_tensors(run_dir, e)
        if shared is not None and not any(k.startswith("backbone.") for k in extra):
            model = _build(meta, backbone=shared)
            full = {**state, **extra}
            _fill(model.head, {k[5:]: v for k, v in full.items() if k.startswith("head.")}, run_dir, e)
        else:
            model = _build(meta)
            _fill(model, {**state, **extra}, run_dir, e)
            if shared is None and not any(k.startswith("backbone.") for k in extra):
                shared = model.backbone  # fold 0's own backbone, or one no fold file overrides
            elif members:
                _share_frozen_prefix(model.eval(), members[0])
        members.append(model.eval())
    return members, entries, meta


def _share_frozen_prefix(model: Classifier, first: Classifier) -> None:
    """Give ``model`` ``first``'s own modules for the frozen stages (before the first trainable one) that hold
    the same tensors: what a fold file leaves out is fold 0's by construction, and a stage it does hold is
    compared tensor by tensor, so a fold whose frozen part differs keeps its own (``Ensemble`` runs it alone)."""
    if model.pool_stages > 1 or model.freeze in ("frozen", "finetune"):
        return
    try:
        ref = stage_chain(first.backbone)
        n = common_prefix(ref[:cut_index(ref)], stage_chain(model.backbone))
    except ConfigError:  # not a plain chain of stages: each fold keeps its whole backbone
        return
    if n:
        adopt_stages(model.backbone, first.backbone, n)
        apply_freeze(model, model.freeze)  # its frozen-BatchNorm list names the adopted modules, not the dropped


def _fill(module: torch.nn.Module, state: dict[str, torch.Tensor], run_dir: Path, entry: dict) -> None:
    """``load_state_dict(strict=True)``, a mismatch (a fold file of a run with other classes or another backbone,
    written before files carried digests) named in one line instead of torch's page of missing keys."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise CheckpointError(f"{checkpoint_dir(run_dir) / entry['file']}: tensors do not fit the model meta.json "
                              f"describes ({detail[:140]}); it belongs to another run: {RETRAIN}") from None
