"""``run_experiment(config) -> RunResult``: data, split, one model per fold, run directory, report."""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file

from oncotransfer.config import ExperimentConfig, load_config, save_config, to_dict
from oncotransfer.data.augment import Augmenter, describe
from oncotransfer.data.overlap import data_warning_lines, split_frame
from oncotransfer.data.splits import Fold, make_split
from oncotransfer.errors import CheckpointError, OncoError
from oncotransfer.models.backbones import get_backbone, with_normalisation
from oncotransfer.models.classifier import Classifier, create_classifier, feature_width
from oncotransfer.models.heads import create_head
from oncotransfer.models.weights import build_backbone
from oncotransfer.train import distributed as D
from oncotransfer.train.checkpoint import (atomic_save_tensors, checkpoint_meta, flatten_optimizer,
                                           unflatten_optimizer, write_checkpoint, write_json)
from oncotransfer.train.data import LoadedData, load_data
from oncotransfer.train.device import pick_device, precision_label, prepare
from oncotransfer.train.features import FeatureCache, resolve_engine
from oncotransfer.train.activations import ActivationCache
from oncotransfer.train.fold_outputs import (FITTED_ON, NO_VAL_NOTE, batch_outputs, fit_fold_temperature, fold_file,
                                             save_fold_tensors, state_snapshot)
from oncotransfer.train.inputs import cached_inputs, image_inputs
from oncotransfer.train.tail_inputs import tail_inputs
from oncotransfer.train.loop import FitState, fit, make_loss, make_optimizer
from oncotransfer.train.preflight import check_before_run, remove_unstarted
from oncotransfer.train.schedule import Schedule, make_schedule


@dataclass
class RunResult:
    run_dir: Path
    metrics: dict
    classes: list[str]

    @property
    def accuracy(self) -> float:
        return float(self.metrics["pooled"]["accuracy"])


def new_run_dir(cfg: ExperimentConfig) -> Path:
    stamp = datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    base = Path(cfg.output_dir) / f"{stamp}_{cfg.name}"
    run_dir, k = base, 1
    while run_dir.exists():
        run_dir, k = Path(f"{base}-{k}"), k + 1
    run_dir.mkdir(parents=True)
    return run_dir


def run_experiment(cfg: ExperimentConfig | None = None, run_dir: str | Path | None = None, *, resume: bool = False,
                   data: LoadedData | None = None, on_epoch_end: Callable[[int, FitState], None] | None = None,
                   log: Callable[[str], None] | None = None, report: bool = True) -> RunResult:
    """Train and evaluate one config; ``resume=True`` continues the run in ``run_dir`` from its saved state.

    Under torchrun every rank calls this; rank 0 alone writes the run directory (see ``train.distributed``)."""
    main = D.is_main()
    say = (log if main else None) or (lambda s: None)
    if resume:
        run_dir = Path(run_dir)
        if main and not (run_dir / "config.yaml").is_file():
            raise CheckpointError(f"--resume {run_dir}: not a run directory (no config.yaml)")
        cfg = D.broadcast(load_config(run_dir / "config.yaml") if main else None)
    t0 = time.perf_counter()
    # Everything that can fail on bad input runs before a run directory exists, so none is left half-made.
    spec = get_backbone(cfg.model.backbone)
    size = cfg.data.image_size or spec.input_size
    data = data or load_data(cfg.data, size, cfg.train.num_workers, phash=cfg.split.group_duplicates)
    m = data.manifest
    split = make_split(m, cfg.split, data.dup_groups)
    check_before_run(cfg, m.classes, resume)
    if not resume:
        if main:
            run_dir = Path(run_dir) if run_dir else new_run_dir(cfg)
            run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, run_dir / "config.yaml")
        run_dir = Path(D.broadcast(str(run_dir) if main else None))
    if main:
        split_frame(split, m, data.phashes).to_csv(run_dir / "split.csv", index=False)
        for line in data_warning_lines(data.warnings, m.skipped, run_dir / "run.json"):
            say(line)
    say(f"{len(m)} images, {len(m.classes)} classes, split {cfg.split.kind}: {len(split.folds)} fold(s), "
        f"{'grouped by ' + split.grouped_by if split.grouped_by else 'IMAGE-LEVEL'}")
    device = D.local_device(pick_device(cfg.train.device))
    aug = Augmenter(cfg.augment)
    histories, preds, best_epochs, modes, fold0, fold0_state, temps = [], [], {}, set(), None, None, {}
    warnings = list(data.warnings) + list(split.warnings)
    try:
        for fold in split.folds:
            model, st, mode = train_fold(cfg, data, fold, run_dir, device, aug, on_epoch_end, say)
            modes.add(mode)
            best_epochs[str(fold.index)] = st.best_epoch
            histories.append(pd.DataFrame(st.history).assign(fold=fold.index))
            temps[str(fold.index)] = _fold_temperature(model, fold, cfg, device)
            preds.append(_fold_predictions(model, data, fold, cfg, device, temps[str(fold.index)]))
            if fold.index == 0:
                fold0, fold0_state = model, state_snapshot(model)
                warnings += list(model.weights.warnings if model.weights else [])
            elif main:  # every fold's model is kept: only the tensors that differ from fold 0's
                save_fold_tensors(run_dir, fold.index, model, fold0_state)
    except KeyboardInterrupt as e:
        e.run_dir = run_dir  # so the CLI can name the directory that --resume continues
        raise
    except OncoError:
        if main and not resume:
            remove_unstarted(run_dir)  # e.g. weights that cannot be had: no folder holding only config.yaml
        raise
    if not main:
        return RunResult(run_dir, {}, m.classes)
    history = pd.concat(histories)[["fold", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]]
    history.to_csv(run_dir / "history.csv", index=False)
    pd.concat(preds).to_csv(run_dir / "predictions.csv", index=False)
    if cfg.evaluate.calibrate and all(t is None for t in temps.values()):
        warnings.append(NO_VAL_NOTE)
    meta = checkpoint_meta(fold0, m.classes, cfg.model.head.model_dump(), to_dict(cfg),
                           {"fold": 0, "n_folds": len(split.folds), "temperature": temps.get("0"),
                            "folds": [{"fold": f.index, "file": fold_file(f.index), "temperature": temps[str(f.index)]}
                                      for f in split.folds]})
    write_checkpoint(run_dir, fold0, meta)
    protocol = {"split": cfg.split.kind, "folds": len(split.folds), "grouped_by": split.grouped_by,
                "image_level": split.image_level, "selection_on_test": split.selection_on_test,
                "augment": describe(cfg.augment), "zoom_mode": cfg.augment.zoom_mode if cfg.augment.zoom else None,
                "feature_cache": "; ".join(sorted(modes))}
    write_json(run_dir / "run.json", {
        "name": cfg.name, "classes": m.classes, "n_images": len(m), "protocol": protocol,
        "best_epochs": best_epochs, "seconds": time.perf_counter() - t0, "device": str(device),
        "precision": precision_label(device, cfg.train.fast_cpu), "weights": cfg.model.weights,
        "backbone": cfg.model.backbone, "warnings": warnings, "skipped": m.skipped,
        "checkpoint": f"fold 0 of {len(split.folds)}" + (" (folds 1.. in checkpoint/folds/)" if len(split.folds) > 1
                                                           else ""),
        "temperatures": temps, "calibration": {"fitted_on": FITTED_ON, "enabled": cfg.evaluate.calibrate},
        "processes": D.world_size()})
    metrics = {}
    if report:
        from oncotransfer.evaluate.report import evaluate_run
        metrics = evaluate_run(run_dir)
    return RunResult(run_dir, metrics, m.classes)


def _class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    counts = np.bincount(labels, minlength=n_classes).astype(np.float32)
    return torch.as_tensor(len(labels) / (n_classes * np.maximum(counts, 1)))


def train_fold(cfg: ExperimentConfig, data: LoadedData, fold: Fold, run_dir: Path, device: torch.device,
               aug: Augmenter, on_epoch_end=None, say=lambda s: None):
    """Build the fold's model (seeded), choose cached or image inputs, fit, keep the best epoch."""
    m = data.manifest
    torch.manual_seed(cfg.train.seed)
    model = _classifier(cfg, len(m.classes))
    model = prepare(model, device, cfg.train.fast_cpu)
    cached = cfg.model.freeze == "frozen" and cfg.train.feature_cache
    if cached:
        engine = resolve_engine(cfg.train.feature_engine, device)
        inputs = cached_inputs(model, data.images, m.labels, m.sha256, fold, cfg,
                               FeatureCache(cfg.train.cache_dir, _cache_key(model, cfg, engine, device), engine),
                               device, aug)
        module, fast = model.head, False
    elif uses_tail_cache(cfg):
        prefix, module, cut = model.tail_split()
        engine = resolve_engine(cfg.train.feature_engine, device)
        cache = ActivationCache(cfg.train.cache_dir, {**_cache_key(model, cfg, engine, device), "cut": cut}, engine)
        inputs = tail_inputs(prefix, model.spec.mean, model.spec.std, data.images, m.labels, m.sha256, fold, cfg,
                             cache, device, aug, cut)
        fast = cfg.train.fast_cpu
    else:
        inputs = image_inputs(model, data.images, m.labels, m.sha256, fold, cfg, device, aug)
        module, fast = model, cfg.train.fast_cpu
    sigmoid = cfg.model.head.sigmoid
    weights = _class_weights(m.labels[fold.train], len(m.classes)).to(device) if cfg.train.class_weights else None
    loss = make_loss(sigmoid, weights, cfg.train.label_smoothing)
    opt = make_optimizer(cfg.train.optimizer, module, cfg.train.lr, cfg.train.weight_decay, cfg.train.backbone_lr_mult)
    sched = make_schedule(opt, cfg.train, -(-inputs.n_train // cfg.train.batch_size))  # batches per epoch
    state_file = run_dir / "state" / f"fold{fold.index}"
    st = _load_state(state_file, module, opt, sched)
    train_module = D.wrap(module, device)

    def save(s: FitState) -> None:
        # Grids skip per-epoch state (a few ms each, comparable to a head epoch); the final state is still saved.
        if D.is_main() and (cfg.train.save_every_epoch or _finished(s, cfg)):
            _save_state(state_file, module, opt, s, sched)
        if on_epoch_end:
            on_epoch_end(fold.index, s)

    if not _finished(st, cfg):
        with _threads(1 if cached else torch.get_num_threads()):
            st = fit(module, opt, loss, inputs.train, inputs.val, cfg.train.epochs, device, fast=fast,
                     sigmoid=sigmoid, patience=cfg.train.early_stop_patience, seed=cfg.train.seed, state=st,
                     on_epoch_end=save, train_module=train_module, scheduler=sched, progress=lambda r: say(
                         f"fold {fold.index} epoch {r['epoch']}/{cfg.train.epochs} loss {r['train_loss']:.4f} "
                         f"acc {r['train_acc']:.3f} val_acc {r['val_acc']:.3f}"))
    elif st.best_state is not None:
        module.load_state_dict(st.best_state, strict=False)
    model._inputs = inputs
    model._aux["trained"] = module  # a plain dict entry: registering the model as its own child would loop
    return model, st, inputs.mode


def uses_tail_cache(cfg: ExperimentConfig) -> bool:
    """A prefix-frozen base trains its tail on cached activations (one process: under torchrun every rank
    recomputes the prefix, since the activation files are not shared between machines)."""
    return (cfg.model.freeze.startswith(("last:", "from:")) and cfg.train.tail_cache and cfg.train.feature_cache
            and D.world_size() == 1)


def _cache_key(model: Classifier, cfg: ExperimentConfig, engine: str, device: torch.device) -> dict:
    key = {"timm": model.spec.timm_name, "weights": model.weights.digest, "pre": model.preprocessing(),
           "precision": "fp32 onnxruntime" if engine == "onnx" else precision_label(device, cfg.train.fast_cpu)}
    if model.pool_stages > 1:  # only then, so existing caches keep their keys
        key["pool_stages"] = model.pool_stages
    return key


_FROZEN: dict[tuple, tuple] = {}
"""(backbone, weights, seed) -> (backbone module, weights info, RNG state after building it), for frozen bases."""


def _classifier(cfg: ExperimentConfig, n_classes: int):
    """``create_classifier``, but a frozen backbone is built once per process and seed (grids run hundreds of
    runs; loading weights cost ~1.3 s a run). It never trains, so sharing it is safe, and restoring the RNG
    state that building it left gives the head exactly the initialisation a fresh build would."""
    mc = cfg.model
    if mc.freeze != "frozen":
        return create_classifier(mc.backbone, mc.weights, mc.head, n_classes, mc.freeze, cfg.data.image_size,
                                 mc.pool_stages)
    key = (mc.backbone, mc.weights, cfg.train.seed, _stamp(mc.weights))
    if key in _FROZEN:
        net, info, rng = _FROZEN[key]
        torch.set_rng_state(rng)
    else:
        net, info = build_backbone(get_backbone(mc.backbone), mc.weights)
        if len(_FROZEN) >= 8:  # bounded: a ResNet50 is ~100 MB
            _FROZEN.pop(next(iter(_FROZEN)))
        _FROZEN[key] = (net, info, torch.get_rng_state())
    spec = with_normalisation(get_backbone(mc.backbone), info.mean, info.std)
    head = create_head(mc.head, feature_width(net, mc.pool_stages), n_classes)
    return Classifier(net, head, spec, cfg.data.image_size or spec.input_size, info, mc.freeze, mc.pool_stages)


def _stamp(weights: str) -> int | None:
    """Modification time of a file:/run: weights source, so a rewritten file is never served from the memo."""
    kind, _, where = weights.partition(":")
    path = Path(where) / "checkpoint" / "model.safetensors" if kind == "run" else Path(where)
    return path.stat().st_mtime_ns if kind in ("file", "run") and path.exists() else None


@contextlib.contextmanager
def _threads(n: int):
    """A head on cached features is a few small matrix products per batch: more threads only add
    synchronisation, which on a busy 2-core machine made each Adam step ~50 ms instead of well under 1 ms."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _finished(st: FitState, cfg: ExperimentConfig) -> bool:
    p = cfg.train.early_stop_patience
    return st.epoch >= cfg.train.epochs or (p is not None and st.bad_epochs >= p)


def _fold_module(model, cfg: ExperimentConfig):
    """What the fold's inputs feed (``train_fold`` records it): the head on cached features, the tail and head
    on cached prefix activations, or the whole classifier on images."""
    module = model._aux["trained"]
    return module, module is not model.head and cfg.train.fast_cpu


def _fold_temperature(model, fold: Fold, cfg: ExperimentConfig, device) -> float | None:
    module, fast = _fold_module(model, cfg)
    return fit_fold_temperature(module, model.head, model._inputs, fold, cfg, device, fast)


def _fold_predictions(model, data: LoadedData, fold: Fold, cfg: ExperimentConfig, device,
                      temperature: float | None = None) -> pd.DataFrame:
    """Test rows of the fold: ``prob_<class>`` as trained, plus ``cal_prob_<class>`` when a temperature exists."""
    m = data.manifest
    module, fast = _fold_module(model, cfg)
    _, _, probs, cal = batch_outputs(module, model.head, model._inputs.test(), device, fast, temperature)
    probs = probs.numpy()
    df = pd.DataFrame({"fold": fold.index, "path": [m.relpath(i) for i in fold.test],
                       "label": [m.classes[m.labels[i]] for i in fold.test],
                       "pred": [m.classes[k] for k in probs.argmax(1)]})
    for c, name in enumerate(m.classes):
        df[f"prob_{name}"] = probs[:, c]
    if cal is not None:
        for c, name in enumerate(m.classes):
            df[f"cal_prob_{name}"] = cal.numpy()[:, c]
    return df


def _save_state(path: Path, module: torch.nn.Module, opt, st: FitState, sched: Schedule | None = None) -> None:
    tensors = {f"model.{k}": v for k, v in module.state_dict().items()}
    if st.best_state is not None:
        tensors.update({f"best.{k}": v for k, v in st.best_state.items()})
    opt_t, opt_info = flatten_optimizer(opt)
    tensors.update(opt_t)
    atomic_save_tensors(tensors, path.with_suffix(".safetensors"))
    write_json(path.with_suffix(".json"), {"epoch": st.epoch, "history": st.history, "best_epoch": st.best_epoch,
                                           "best_score": list(st.best_score), "bad_epochs": st.bad_epochs,
                                           "optimizer": opt_info,
                                           **({"schedule": sched.state_dict()} if sched else {})})


def _load_state(path: Path, module: torch.nn.Module, opt, sched: Schedule | None = None) -> FitState:
    """The saved fit state, read by rank 0 and sent to the others (their file system may not hold it)."""
    saved = None
    if D.is_main() and path.with_suffix(".json").is_file():
        saved = (json.loads(path.with_suffix(".json").read_text()), load_file(str(path.with_suffix(".safetensors"))))
    saved = D.broadcast(saved)
    if saved is None:
        return FitState()
    info, tensors = saved
    module.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    unflatten_optimizer(opt, tensors, info["optimizer"])
    if sched is not None and "schedule" in info:  # state written before schedules existed: constant lr
        sched.load_state_dict(info["schedule"])
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
    return FitState(info["epoch"], info["history"], info["best_epoch"], tuple(info["best_score"]), best,
                    info["bad_epochs"])
