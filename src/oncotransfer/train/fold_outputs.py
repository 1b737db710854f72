"""What a trained fold leaves behind besides its history: its test predictions with their logits, its validation
logits (the only rows temperature scaling is fitted on; ``calibrate_folds`` decides the temperatures once every
fold is done), and the checkpoint tensors in which its model differs from fold 0's."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import torch
from torch import nn

from oncotransfer.io import atomic_save_tensors
from oncotransfer.models.heads import probabilities
from oncotransfer.train import distributed as D
from oncotransfer.train import temperature
from oncotransfer.train.device import autocast

NO_VAL_NOTE = "not calibrated: no validation split (split.val_size 0 or a holdout split), and the test fold is never used"


def fold_file(k: int) -> str:
    """Where fold ``k``'s model lives, relative to RUN/checkpoint (fold 0: the old single-model file)."""
    return "model.safetensors" if k == 0 else f"folds/fold{k}.safetensors"


@torch.inference_mode()
def batch_outputs(module: nn.Module, head, batches: Iterable, device: torch.device, fast: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, labels, probabilities) over ``batches``, in batch order, gathered from every rank.
    Probabilities are taken per batch exactly as ``train.loop.evaluate`` does."""
    module.eval()
    logits, labels, probs = [], [], []
    for x, y in batches:
        x, y = D.shard(x).to(device), D.shard(y).to(device)
        with autocast(device, fast):
            z = module(x)
        logits.append(D.gather_cat(z.float().cpu()))
        labels.append(D.gather_cat(y.cpu()))
        probs.append(D.gather_cat(head.probabilities(z).cpu()))
    if not logits:
        empty = torch.zeros((0, 0))
        return empty, torch.zeros(0, dtype=torch.long), empty
    return torch.cat(logits), torch.cat(labels), torch.cat(probs)


@dataclass
class FoldOutputs:
    """One fold's test rows (``prob_<class>`` as trained) with their logits, and its validation (logits, labels)
    for temperature scaling (None: calibration off, or no validation subset of its own)."""
    fold: int
    predictions: pd.DataFrame
    test_logits: torch.Tensor
    val: tuple[np.ndarray, np.ndarray] | None

    def calibrated(self, t: float | None, sigmoid: bool) -> pd.DataFrame:
        """The predictions plus ``cal_prob_<class>`` (the test logits over ``t``); unchanged when ``t`` is None."""
        if t is None or self.predictions.empty:
            return self.predictions
        p = probabilities(self.test_logits, sigmoid, t).numpy()
        classes = [c[len("prob_"):] for c in self.predictions.columns if c.startswith("prob_")]
        return self.predictions.assign(**{f"cal_prob_{c}": p[:, k] for k, c in enumerate(classes)})


def calibrate_folds(outputs: list[FoldOutputs], mode: str, sigmoid: bool
                    ) -> tuple[list[pd.DataFrame], temperature.TemperatureChoice]:
    """Every fold's predictions with calibrated columns, once all folds are trained: the temperature(s) come
    from the validation logits alone (``temperature.choose_temperatures``: pooled, or per fold when large)."""
    choice = temperature.choose_temperatures({o.fold: o.val for o in outputs}, sigmoid, mode)
    return [o.calibrated(choice.temperatures[str(o.fold)], sigmoid) for o in outputs], choice


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def differing_tensors(model: nn.Module, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``model.state_dict()`` that differ from ``reference`` (fold 0): a frozen backbone is the
    same in every fold, so for frozen runs this is the head alone."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        ref = reference.get(k)
        if ref is None or ref.shape != v.shape or ref.dtype != v.dtype or not torch.equal(ref, v):
            out[k] = v
    return out


def save_fold_tensors(run_dir: Path, k: int, model: nn.Module, reference: dict[str, torch.Tensor]) -> Path:
    path = Path(run_dir) / "checkpoint" / fold_file(k)
    atomic_save_tensors(differing_tensors(model, reference), path,
                        {"format": "oncotransfer-fold/1", "base": "model.safetensors", "fold": str(k)})
    return path
