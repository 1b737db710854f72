"""Training inputs for one fold: cached features for a frozen base, or (augmented) images otherwise."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from oncotransfer.config import ExperimentConfig
from oncotransfer.data.augment import Augmenter, augment_views
from oncotransfer.data.images import normalise
from oncotransfer.progress import Progress, counter
from oncotransfer.train.distributed import sharded_map, world_size
from oncotransfer.train.features import FeatureCache


def epoch_generator(seed: int, epoch: int, salt: str = "") -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{epoch}:{salt}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:7], "little"))


@dataclass
class FoldInputs:
    """Batch sources for one fold. ``train(epoch)`` reshuffles with a generator seeded by (seed, epoch)."""
    train: Callable[[int], list]
    val: Callable[[], list]
    test: Callable[[], list]
    mode: str
    n_train: int
    originals: Callable[[], list]
    """The training images themselves, unshuffled and unaugmented (what an out-of-distribution detector fits)."""


def _batches(x: torch.Tensor, y: torch.Tensor, bs: int, order: torch.Tensor | None = None,
             transform: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> list:
    idx = order if order is not None else torch.arange(len(y))
    out = []
    for b, start in enumerate(range(0, len(idx), bs)):
        sel = idx[start:start + bs]
        xb = x[sel]
        out.append((transform(xb, b) if transform else xb, y[sel]))
    return out


def n_views(cfg: ExperimentConfig) -> int:
    aug = cfg.augment
    return aug.copies if aug.active and aug.mode in ("offline", "online") else 0


def cached_inputs(model, images: torch.Tensor, labels: np.ndarray, shas: list[str], fold, cfg: ExperimentConfig,
                  cache: FeatureCache, device: torch.device, aug: Augmenter,
                  progress: Progress | None = None) -> FoldInputs:
    """Features once per image and view (view 0 = original; 1..K = augmented copies, fixed per image).
    ``progress`` hears of each view's extraction (images not in the cache), in one process only."""
    fast = cfg.train.fast_cpu
    k = n_views(cfg)

    def compute(view: int):
        def run(missing: list[int]) -> torch.Tensor:
            tick = counter(progress if world_size() == 1 else None, view_task("features", view, k), len(missing))
            imgs = images[missing]
            if view > 0:
                imgs = augment_views(imgs, [shas[i] for i in missing], aug, cfg.augment.seed, view)
            return cache.extract(model.feature_module(), imgs, model.spec.mean, model.spec.std, device, fast,
                                 on_batch=tick)
        return lambda missing: sharded_map(run, missing)  # under torchrun each rank extracts 1/N, then gathered

    aug_key = cfg.augment.model_dump(exclude={"mode", "copies"})
    feats = [cache.get({"view": 0}, shas, compute(0))]
    feats += [cache.get({"view": v, "augment": aug_key}, shas, compute(v)) for v in range(1, k + 1)]
    y = torch.as_tensor(labels)
    tr = torch.as_tensor(fold.train)
    bs, seed = cfg.train.batch_size, cfg.train.seed
    if k and cfg.augment.mode == "offline":
        x_tr = torch.cat([f[tr] for f in feats])
        y_tr = y[tr].repeat(k + 1)
        mode = f"features, offline copies ({k} per image)"
    else:
        x_tr, y_tr = feats[0][tr], y[tr]
        mode = f"view bank ({k} views per image)" if k else "features"

    def train(epoch: int) -> list:
        g = epoch_generator(seed, epoch)
        order = torch.randperm(len(y_tr), generator=g)
        if k and cfg.augment.mode == "online":
            pick = torch.randint(1, k + 1, (len(tr),), generator=g)
            bank = torch.stack([f[tr] for f in feats])  # (K+1, n, F)
            x = bank[pick, torch.arange(len(tr))]
            return _batches(x, y_tr, bs, order)
        return _batches(x_tr, y_tr, bs, order)

    va, te = torch.as_tensor(fold.val), torch.as_tensor(fold.test)
    return FoldInputs(train, lambda: _batches(feats[0][va], y[va], 256), lambda: _batches(feats[0][te], y[te], 256),
                      mode, len(y_tr), lambda: _batches(feats[0][tr], y[tr], 256))


def view_task(what: str, view: int, k: int) -> str:
    """The progress task of extracting one view: the originals, or augmented copy ``view`` of ``k``."""
    return what if view == 0 else f"{what}, augmented copy {view}/{k}"


def image_inputs(model, images: torch.Tensor, labels: np.ndarray, shas: list[str], fold, cfg: ExperimentConfig,
                 device: torch.device, aug: Augmenter) -> FoldInputs:
    """Images through the whole model each epoch (fine-tuning, or a frozen base with the cache off)."""
    fast = cfg.train.fast_cpu and device.type in ("cpu", "cuda")
    mean, std = model.spec.mean, model.spec.std
    k = n_views(cfg)
    y = torch.as_tensor(labels)
    tr = torch.as_tensor(fold.train)
    x_tr, y_tr = images[tr], y[tr]
    if k and cfg.augment.mode == "offline":
        tr_shas = [shas[i] for i in fold.train]
        copies = [augment_views(x_tr, tr_shas, aug, cfg.augment.seed, v) for v in range(1, k + 1)]
        x_tr, y_tr = torch.cat([x_tr, *copies]), y_tr.repeat(k + 1)
    online = cfg.augment.mode == "online" and cfg.augment.active

    def prep(x: torch.Tensor) -> torch.Tensor:
        x = normalise(x, mean, std)
        return x.contiguous(memory_format=torch.channels_last) if fast else x

    def train(epoch: int) -> list:
        g = epoch_generator(seed := cfg.train.seed, epoch)
        order = torch.randperm(len(y_tr), generator=g)

        def transform(xb: torch.Tensor, b: int) -> torch.Tensor:
            if online:
                rng = np.random.default_rng([cfg.augment.seed, seed, epoch, b])
                xb = aug(xb, rng)
            return prep(xb)
        return _LazyBatches(x_tr, y_tr, cfg.train.batch_size, order, transform)

    def fixed(idx: np.ndarray) -> Callable[[], list]:
        t = torch.as_tensor(idx)
        return lambda: _LazyBatches(images[t], y[t], 64, None, lambda xb, b: prep(xb))

    mode = "none (images every epoch)" + (f", offline copies ({k} per image)" if k and not online else "")
    return FoldInputs(train, fixed(fold.val), fixed(fold.test), mode, len(y_tr), fixed(fold.train))


class _LazyBatches:
    """Yields batches on demand so augmented, normalised float copies never all sit in memory at once."""

    def __init__(self, x, y, bs, order, transform):
        self.x, self.y, self.bs, self.transform = x, y, bs, transform
        self.order = order if order is not None else torch.arange(len(y))

    def __iter__(self):
        for b, start in enumerate(range(0, len(self.order), self.bs)):
            sel = self.order[start:start + self.bs]
            yield self.transform(self.x[sel], b), self.y[sel]
