"""Training inputs for tail fine-tuning: cached prefix activations per image and view, gathered per batch."""
from __future__ import annotations

import numpy as np
import torch

from oncotransfer.config import ExperimentConfig
from oncotransfer.data.augment import Augmenter, augment_views
from oncotransfer.train.activations import ActivationBank, ActivationCache
from oncotransfer.progress import Progress, counter
from oncotransfer.train.inputs import FoldInputs, epoch_generator, n_views, view_task


class _Gathered:
    """Batches of (activations, labels) read from the bank on demand, in ``order``."""

    def __init__(self, bank: ActivationBank, views: np.ndarray, pos: np.ndarray, y: torch.Tensor, bs: int,
                 order: torch.Tensor | None, channels_last: bool):
        self.bank, self.views, self.pos, self.y, self.bs = bank, views, pos, y, bs
        self.order = order.numpy() if order is not None else np.arange(len(y))
        self.channels_last = channels_last

    def __iter__(self):
        for start in range(0, len(self.order), self.bs):
            sel = self.order[start:start + self.bs]
            x = self.bank.gather(self.views[sel], self.pos[sel])
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.y[torch.as_tensor(sel)]


def tail_inputs(prefix: torch.nn.Module, mean: tuple, std: tuple, images: torch.Tensor, labels: np.ndarray,
                shas: list[str], fold, cfg: ExperimentConfig, cache: ActivationCache, device: torch.device,
                aug: Augmenter, cut: str, progress: Progress | None = None) -> FoldInputs:
    """Like ``cached_inputs``, one level down: the prefix runs once per image and view, the tail every epoch.
    Batch order and view choice use the same generators, so a run matches its uncached twin batch for batch."""
    fast = cfg.train.fast_cpu and device.type in ("cpu", "cuda")
    k = n_views(cfg)

    def view(key: dict, v: int):
        tick = None

        def start(n_missing: int) -> None:  # the cache computes in chunks: one progress task for all of them
            nonlocal tick
            tick = counter(progress, view_task(f"activations at {cut}", v, k), n_missing)

        def run(missing: list[int]) -> np.ndarray:
            imgs = images[missing]
            if v > 0:
                imgs = augment_views(imgs, [shas[i] for i in missing], aug, cfg.augment.seed, v)
            return cache.extract(prefix, imgs, mean, std, device, fast, on_batch=tick)
        return cache.get(key, shas, run, on_missing=start)

    aug_key = cfg.augment.model_dump(exclude={"mode", "copies"})
    views = [view({"view": 0}, 0)]
    views += [view({"view": v, "augment": aug_key}, v) for v in range(1, k + 1)]
    bank = ActivationBank(views, int(cfg.train.cache_memory_mb) << 20)
    y = torch.as_tensor(labels)
    tr = np.asarray(fold.train, dtype=np.int64)
    bs, seed = cfg.train.batch_size, cfg.train.seed
    offline = bool(k) and cfg.augment.mode == "offline"
    if offline:
        v_tr, p_tr = np.repeat(np.arange(k + 1), len(tr)), np.tile(tr, k + 1)
    else:
        v_tr, p_tr = np.zeros(len(tr), np.int64), tr
    y_tr = y[torch.as_tensor(p_tr)]
    where = "streamed from disk" if bank.streaming else "in memory"
    mode = f"activations at {cut} (fp16, {bank.nbytes / 2**20:.0f} MiB, {where})"
    mode += f", offline copies ({k} per image)" if offline else (f", view bank ({k} views per image)" if k else "")

    def train(epoch: int) -> _Gathered:
        g = epoch_generator(seed, epoch)
        order = torch.randperm(len(y_tr), generator=g)
        if k and cfg.augment.mode == "online":
            pick = torch.randint(1, k + 1, (len(tr),), generator=g).numpy()
            return _Gathered(bank, pick, tr, y_tr, bs, order, fast)
        return _Gathered(bank, v_tr, p_tr, y_tr, bs, order, fast)

    def fixed(idx) -> callable:
        pos = np.asarray(idx, dtype=np.int64)
        return lambda: _Gathered(bank, np.zeros(len(pos), np.int64), pos, y[torch.as_tensor(pos)], 128, None, fast)

    return FoldInputs(train, fixed(fold.val), fixed(fold.test), mode, len(y_tr), fixed(fold.train))
