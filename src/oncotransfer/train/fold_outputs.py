"""What a trained fold leaves behind besides its history: logits, a temperature fitted on its validation
subset (never its test subset), and the checkpoint tensors in which its model differs from fold 0's."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from oncotransfer.config import ExperimentConfig
from oncotransfer.data.splits import Fold
from oncotransfer.io import atomic_save_tensors
from oncotransfer.train import distributed as D
from oncotransfer.train import temperature
from oncotransfer.train.device import autocast

NO_VAL_NOTE = "not calibrated: no validation split (split.val_size 0 or a holdout split), and the test fold is never used"
FITTED_ON = "validation subset of each fold"


def fold_file(k: int) -> str:
    """Where fold ``k``'s model lives, relative to RUN/checkpoint (fold 0: the old single-model file)."""
    return "model.safetensors" if k == 0 else f"folds/fold{k}.safetensors"


@torch.inference_mode()
def batch_outputs(module: nn.Module, head, batches: Iterable, device: torch.device, fast: bool = False,
                  temperature: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logits, labels, probabilities, calibrated probabilities or None) over ``batches``, in batch order,
    gathered from every rank. Probabilities are taken per batch exactly as ``train.loop.evaluate`` does."""
    module.eval()
    logits, labels, probs, cal = [], [], [], []
    for x, y in batches:
        x, y = D.shard(x).to(device), D.shard(y).to(device)
        with autocast(device, fast):
            z = module(x)
        logits.append(D.gather_cat(z.float().cpu()))
        labels.append(D.gather_cat(y.cpu()))
        probs.append(D.gather_cat(head.probabilities(z).cpu()))
        if temperature is not None:
            cal.append(D.gather_cat(head.probabilities(z, temperature).cpu()))
    if not logits:
        empty = torch.zeros((0, 0))
        return empty, torch.zeros(0, dtype=torch.long), empty, empty if temperature is not None else None
    return torch.cat(logits), torch.cat(labels), torch.cat(probs), torch.cat(cal) if cal else None


def fit_fold_temperature(module: nn.Module, head, inputs, fold: Fold, cfg: ExperimentConfig,
                         device: torch.device, fast: bool = False) -> float | None:
    """Temperature scaling on the fold's ``val`` subset (the one epoch selection used). None when
    calibration is off or the fold has no validation subset of its own (its "val" would be the test fold)."""
    if not cfg.evaluate.calibrate or fold.selection_on_test or len(fold.val) == 0:
        return None
    logits, y, _, _ = batch_outputs(module, head, inputs.val(), device, fast)
    return temperature.fit_temperature(logits.numpy(), y.numpy(), bool(cfg.model.head.sigmoid))


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
