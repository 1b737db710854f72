"""One fold: build its model (seeded), choose cached or image inputs, fit, keep the best epoch; its test
predictions and the validation logits that temperature scaling is fitted on."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from oncotransfer.config import ExperimentConfig
from oncotransfer.data.augment import Augmenter
from oncotransfer.data.splits import Fold
from oncotransfer.models.classifier import Classifier
from oncotransfer.models.factory import classifier_for
from oncotransfer.progress import Progress
from oncotransfer.runtables import predictions_table
from oncotransfer.train import distributed as D
from oncotransfer.train.activations import ActivationCache
from oncotransfer.train.checkpoint import load_fit_state, save_fit_state
from oncotransfer.train.data import LoadedData
from oncotransfer.train.device import precision_label, prepare
from oncotransfer.train.features import FeatureCache, resolve_engine
from oncotransfer.train.fold_outputs import FoldOutputs, batch_outputs
from oncotransfer.train.inputs import FoldInputs, cached_inputs, image_inputs
from oncotransfer.train.loop import FitState, fit, make_optimizer
from oncotransfer.train.ood import FoldOOD, fit_fold_ood
from oncotransfer.train.schedule import make_schedule
from oncotransfer.train.tail_inputs import tail_inputs


def _class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    counts = np.bincount(labels, minlength=n_classes).astype(np.float32)
    return torch.as_tensor(len(labels) / (n_classes * np.maximum(counts, 1)))


@dataclass
class FoldResult:
    """One trained fold as ``train_fold`` hands it on: the model at its best epoch, its fit state (history, best
    epoch), the inputs it trained on and the module they feed (the head on cached features, tail + head on cached
    activations, or the whole classifier), which its outputs and out-of-distribution detector are computed with."""
    fold: Fold
    model: Classifier
    state: FitState
    inputs: FoldInputs
    module: torch.nn.Module
    fast: bool
    """Whether ``module`` runs in the fast CPU precision (never for a head on cached features)."""

    @property
    def mode(self) -> str:
        return self.inputs.mode

    @property
    def best_epoch(self) -> int:
        return self.state.best_epoch

    @property
    def history(self) -> list[dict]:
        return self.state.history


def train_fold(cfg: ExperimentConfig, data: LoadedData, fold: Fold, run_dir: Path, device: torch.device,
               aug: Augmenter, on_epoch_end=None, say=lambda s: None, progress: Progress | None = None
               ) -> FoldResult:
    """Build the fold's model (seeded), choose cached or image inputs, fit, keep the best epoch.
    ``progress`` hears of feature or activation extraction and of each epoch ("epochs")."""
    m = data.manifest
    torch.manual_seed(cfg.train.seed)
    model = classifier_for(cfg.model, len(m.classes), cfg.data.image_size, cfg.train.seed)
    model = prepare(model, device, cfg.train.fast_cpu)
    cached = cfg.model.freeze == "frozen" and cfg.train.feature_cache
    if cached:
        engine = resolve_engine(cfg.train.feature_engine, device)
        inputs = cached_inputs(model, data.images, m.labels, m.sha256, fold, cfg,
                               FeatureCache(cfg.train.cache_dir, _cache_key(model, cfg, engine, device), engine),
                               device, aug, progress)
        module, fast = model.head, False
    elif uses_tail_cache(cfg):
        prefix, module, cut = model.tail_split()
        engine = resolve_engine(cfg.train.feature_engine, device)
        cache = ActivationCache(cfg.train.cache_dir, {**_cache_key(model, cfg, engine, device), "cut": cut}, engine)
        inputs = tail_inputs(prefix, model.spec.mean, model.spec.std, data.images, m.labels, m.sha256, fold, cfg,
                             cache, device, aug, cut, progress)
        fast = cfg.train.fast_cpu
    else:
        inputs = image_inputs(model, data.images, m.labels, m.sha256, fold, cfg, device, aug)
        module, fast = model, cfg.train.fast_cpu
    sigmoid = cfg.model.head.sigmoid
    weights = _class_weights(m.labels[fold.train], len(m.classes)).to(device) if cfg.train.class_weights else None
    loss = model.head.loss(weights, cfg.train.label_smoothing)
    opt = make_optimizer(cfg.train.optimizer, module, cfg.train.lr, cfg.train.weight_decay, cfg.train.backbone_lr_mult)
    sched = make_schedule(opt, cfg.train, -(-inputs.n_train // cfg.train.batch_size))  # batches per epoch
    state_file = run_dir / "state" / f"fold{fold.index}"
    st = load_fit_state(state_file, module, opt, sched)
    train_module = D.wrap(module, device)

    def save(s: FitState) -> None:
        # Grids skip per-epoch state (a few ms each, comparable to a head epoch); the final state is still saved.
        if D.is_main() and (cfg.train.save_every_epoch or _finished(s, cfg)):
            save_fit_state(state_file, module, opt, s, sched)
        if on_epoch_end:
            on_epoch_end(fold.index, s)

    def epoch_done(r: dict) -> None:
        say(f"fold {fold.index} epoch {r['epoch']}/{cfg.train.epochs} loss {r['train_loss']:.4f} "
            f"acc {r['train_acc']:.3f} val_acc {r['val_acc']:.3f}")
        if progress:
            progress("epochs", r["epoch"], cfg.train.epochs)

    if not _finished(st, cfg):
        with _threads(1 if cached else torch.get_num_threads()):
            st = fit(module, opt, loss, inputs.train, inputs.val, cfg.train.epochs, device, fast=fast,
                     sigmoid=sigmoid, patience=cfg.train.early_stop_patience, seed=cfg.train.seed, state=st,
                     on_epoch_end=save, train_module=train_module, scheduler=sched, progress=epoch_done)
        if progress and st.epoch < cfg.train.epochs:  # stopped early: the task ends at the last epoch run
            progress("epochs", st.epoch, st.epoch)
    elif st.best_state is not None:
        module.load_state_dict(st.best_state, strict=False)
    return FoldResult(fold, model, st, inputs, module, fast)


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
    # Rows are addressed by file hash, but data.us_region decodes one ultrasound file to two different images
    # (cropped or whole): without it in the key, `off` would read the features of `auto`'s crops.
    key["us_region"] = cfg.data.us_region
    return key


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


def fold_ood(result: FoldResult, data: LoadedData, cfg: ExperimentConfig, reference: bool = False
             ) -> FoldOOD | None:
    """The fold's out-of-distribution detector (``train.ood``), fitted on its training originals."""
    return fit_fold_ood(result.module, result.model.head, result.inputs, result.fold, data.manifest.labels, cfg,
                        reference)


def collect_outputs(result: FoldResult, data: LoadedData, cfg: ExperimentConfig, device) -> FoldOutputs:
    """Test rows of the fold (``prob_<class>`` as trained) with their logits, and the logits of its ``val``
    subset (the one epoch selection used) when calibration is on and the fold has one of its own (a fold
    selecting on its test rows has none: its "val" would be the test fold)."""
    m, fold, head = data.manifest, result.fold, result.model.head
    logits, _, probs = batch_outputs(result.module, head, result.inputs.test(), device, result.fast)
    frame = predictions_table([m.relpath(i) for i in fold.test], probs.numpy(), m.classes, fold=fold.index,
                              labels=[m.classes[m.labels[i]] for i in fold.test])
    val = None
    if cfg.evaluate.calibrate and not fold.selection_on_test and len(fold.val):
        z, y, _ = batch_outputs(result.module, head, result.inputs.val(), device, result.fast)
        val = (z.numpy(), y.numpy())
    return FoldOutputs(fold.index, frame, logits, val)
