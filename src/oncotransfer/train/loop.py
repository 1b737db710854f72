"""Plain ``train_one_epoch`` / ``evaluate`` / ``fit`` over batches of (inputs, targets).

Inputs are images for a full model or cached features for a head: the loop does not care.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Literal, get_args

import numpy as np
import torch
from torch import nn

from oncotransfer.errors import ConfigError
from oncotransfer.models.heads import probabilities
from oncotransfer.train import distributed as D
from oncotransfer.train.device import autocast

if TYPE_CHECKING:
    from oncotransfer.train.schedule import Schedule

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


OptimizerName = Literal["adam", "adamw", "adagrad", "sgd"]
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)


def param_groups(module: nn.Module, lr: float, backbone_lr_mult: float = 1.0) -> list[dict]:
    """Trainable parameters as optimizer groups: the head (everything not under ``backbone.``) at ``lr`` first,
    then the backbone at ``lr * backbone_lr_mult``. A multiplier of 1, or a module with no trainable backbone
    parameter (a head on cached features), gives one group in the module's own order, as before."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    backbone = [p for n, p in named if n.startswith("backbone.")]
    if backbone_lr_mult == 1.0 or not backbone:
        return [{"params": [p for _, p in named], "lr": lr}]
    head = [p for n, p in named if not n.startswith("backbone.")]
    groups = [{"params": head, "lr": lr}] if head else []
    return groups + [{"params": backbone, "lr": lr * backbone_lr_mult}]


def make_optimizer(name: OptimizerName, params, lr: float, weight_decay: float = 0.0,
                   backbone_lr_mult: float = 1.0) -> torch.optim.Optimizer:
    """``params``: a module (its trainable parameters, grouped by ``param_groups``) or an iterable of parameters
    (one group). Group 0 is the head's, so ``param_groups[0]["lr"]`` is the head's lr."""
    if name not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer: unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
    if isinstance(params, nn.Module):
        params = param_groups(params, lr, backbone_lr_mult)
    else:
        params = [p for p in params if p.requires_grad]
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


def train_one_epoch(module: nn.Module, batches: Batches, optimizer: torch.optim.Optimizer, loss_fn: Callable,
                    device: torch.device, fast: bool = False, sigmoid: bool = False,
                    scheduler: Schedule | None = None) -> tuple[float, float]:
    """One pass over ``batches``. Under torchrun ``module`` is DDP-wrapped and each rank trains on its slice of
    every global batch, its loss weighted by its share, so the averaged gradient is the global batch's.
    ``scheduler.step_batch()`` follows every optimizer step."""
    module.train()
    world = D.world_size()
    total, correct, loss_sum = 0, 0, 0.0
    for x, y in batches:
        n_global = len(y)
        x, y = D.shard(x).to(device), D.shard(y).to(device)
        with autocast(device, fast):
            logits = module(x)
        n = len(y)
        loss = loss_fn(logits, y) if n else logits.sum() * 0.0  # an empty slice still joins the all-reduce
        optimizer.zero_grad(set_to_none=True)
        (loss * (n * world / n_global)).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step_batch()
        total += n
        loss_sum += float(loss.detach()) * n
        correct += int((probabilities(logits.detach(), sigmoid).argmax(1) == y).sum())
    loss_sum, correct, total = D.all_sum(loss_sum, correct, total)
    return loss_sum / max(total, 1), correct / max(total, 1)


@torch.inference_mode()
def evaluate(module: nn.Module, batches: Batches, loss_fn: Callable, device: torch.device, fast: bool = False,
             sigmoid: bool = False) -> tuple[float, float, np.ndarray]:
    """Mean loss, accuracy and the (N, C) probabilities, in batch order (gathered from every rank)."""
    module.eval()
    total, correct, loss_sum, probs = 0, 0, 0.0, []
    for x, y in batches:
        x, y = D.shard(x).to(device), D.shard(y).to(device)
        with autocast(device, fast):
            logits = module(x)
        p = probabilities(logits, sigmoid)
        n = len(y)
        total += n
        loss_sum += float(loss_fn(logits, y)) * n if n else 0.0
        correct += int((p.argmax(1) == y).sum())
        probs.append(D.gather_cat(p.cpu()))
    loss_sum, correct, total = D.all_sum(loss_sum, correct, total)
    return loss_sum / max(total, 1), correct / max(total, 1), torch.cat(probs).numpy() if probs else np.zeros((0, 0))


@dataclass
class FitState:
    """Everything needed to continue a fit after an interruption."""
    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_score: tuple[float, float] = (-1.0, float("-inf"))
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs: int = 0


def fit(module: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable,
        train_batches: Callable[[int], Batches], val_batches: Callable[[], Batches], epochs: int,
        device: torch.device, *, fast: bool = False, sigmoid: bool = False, patience: int | None = None,
        seed: int = 0, state: FitState | None = None,
        on_epoch_end: Callable[[FitState], None] | None = None, progress: Callable[[dict], None] | None = None,
        train_module: nn.Module | None = None, scheduler: Schedule | None = None) -> FitState:
    """Train for ``epochs``, keeping the best validation epoch (highest accuracy, then lowest loss).

    Every epoch re-seeds torch from (seed, epoch) so a resumed fit replays exactly what an uninterrupted one does.
    ``train_module`` (a DDP wrapper of ``module`` under torchrun) is what trains; ``module`` is evaluated and kept.
    ``scheduler`` (train.schedule) steps after every batch and after every validation, before ``on_epoch_end``
    saves state. A history row's ``lr`` is group 0's (the head's) at the epoch's start: its first batch's lr.
    """
    st = state or FitState()
    while st.epoch < epochs:
        epoch = st.epoch
        torch.manual_seed(seed * 100003 + epoch)
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        tr_loss, tr_acc = train_one_epoch(train_module or module, train_batches(epoch), optimizer, loss_fn, device,
                                          fast, sigmoid, scheduler)
        va_loss, va_acc, _ = evaluate(module, val_batches(), loss_fn, device, fast, sigmoid)
        if scheduler is not None:
            scheduler.step_epoch(va_loss)
        row = {"epoch": epoch + 1, "train_loss": tr_loss, "train_acc": tr_acc, "val_loss": va_loss,
               "val_acc": va_acc, "lr": lr, "seconds": time.perf_counter() - t0}
        st.history.append(row)
        score = (va_acc, -va_loss)
        if score > st.best_score:
            st.best_score, st.best_epoch, st.bad_epochs = score, epoch + 1, 0
            st.best_state = {k: v.detach().clone() for k, v in _trainable_state(module).items()}
        else:
            st.bad_epochs += 1
        st.epoch = epoch + 1
        if progress:
            progress(row)
        if on_epoch_end:
            on_epoch_end(st)
        if patience is not None and st.bad_epochs >= patience:
            break
    if st.best_state is not None:
        module.load_state_dict(st.best_state, strict=False)
    return st


def _trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state that training can change: all of it, unless the module is a classifier with a frozen base."""
    return copy.copy(module.state_dict())
