"""Learning-rate schedules of one fit: constant, cosine with warm-up, one-cycle, reduce-on-plateau.

``make_schedule(optimizer, train_cfg, steps_per_epoch)`` returns a ``Schedule`` that ``fit`` steps after every
batch (``step_batch``) and after every validation (``step_epoch``). Cosine and one-cycle give each batch the
learning rate ``lr * factor(step)``, a pure function of the global batch count, so resuming needs that count
only; reduce-on-plateau keeps torch's own small state. ``state_dict()`` is plain JSON (no pickle, no Infinity).

Every parameter group is scaled by the same factor, so a backbone group at ``lr * backbone_lr_mult`` keeps its
ratio to the head throughout.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from oncotransfer.config import TrainConfig
from oncotransfer.errors import CheckpointError

ONECYCLE_DIV = 25.0
"""One-cycle starts at lr / 25 and ends at lr / 25 / 1e4, torch.optim.lr_scheduler.OneCycleLR's defaults."""
ONECYCLE_FINAL_DIV = 1e4


def lr_factor(kind: str, step: int, warmup_steps: float, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base lr for batch ``step`` (0-based) of ``total_steps``.

    cosine: linear warm-up ``(step + 1) / (W + 1)`` up to 1 at step W, then half a cosine down to
    ``min_lr_ratio``, reached exactly at the last batch. onecycle: linear warm-up from 1/25 at step 0 to 1 at
    step W (the peak), then half a cosine down to 1/25/1e4 at the last batch. W may be fractional.
    """
    if kind == "cosine":
        start, floor = None, min_lr_ratio
    elif kind == "onecycle":
        start, floor = 1.0 / ONECYCLE_DIV, 1.0 / (ONECYCLE_DIV * ONECYCLE_FINAL_DIV)
    else:
        raise ValueError(f"lr_factor: no per-step factor for schedule {kind!r}")
    w = float(warmup_steps)
    if step < w:
        if start is None:  # from lr / (W + 1), so the first batch already learns
            return (step + 1) / (w + 1)
        return start + (1.0 - start) * step / w
    span = total_steps - 1 - w
    p = 1.0 if span <= 0 else min(1.0, (step - w) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * p))


class Schedule:
    """The schedule of one fit; ``kind`` is ``TrainConfig.schedule``."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
        self.kind = cfg.schedule
        self.steps_per_epoch = max(int(steps_per_epoch), 1)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup_steps = cfg.warmup_epochs * self.steps_per_epoch
        self._torch: LambdaLR | ReduceLROnPlateau | None = None
        if self.kind in ("cosine", "onecycle"):
            self._torch = LambdaLR(optimizer, self._factor_fn(cfg.min_lr_ratio))
        elif self.kind == "plateau":
            # torch semantics: the lr is multiplied by `factor` once more than `patience` epochs in a row
            # have not improved the validation loss (relative threshold 1e-4).
            self._torch = ReduceLROnPlateau(optimizer, mode="min", factor=cfg.plateau_factor,
                                            patience=cfg.plateau_patience)

    def _factor_fn(self, min_lr_ratio: float) -> Callable[[int], float]:
        kind, w, total = self.kind, self.warmup_steps, self.total_steps

        def factor(step: int) -> float:  # a plain function: LambdaLR then keeps nothing of it in its state
            return lr_factor(kind, step, w, total, min_lr_ratio)
        return factor

    def step_batch(self) -> None:
        """After each optimizer step: the next batch's lr."""
        if isinstance(self._torch, LambdaLR):
            self._torch.step()

    def step_epoch(self, val_loss: float) -> None:
        """After each epoch's validation: plateau watches the validation loss."""
        if isinstance(self._torch, ReduceLROnPlateau):
            self._torch.step(val_loss)

    def state_dict(self) -> dict[str, Any]:
        state = {} if self._torch is None else _to_json(self._torch.state_dict())
        return {"kind": self.kind, "steps_per_epoch": self.steps_per_epoch, "torch": state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != self.kind or state.get("steps_per_epoch") != self.steps_per_epoch:
            raise CheckpointError(f"resume: the saved lr schedule ({state.get('kind')}, "
                                  f"{state.get('steps_per_epoch')} steps per epoch) does not match this run's "
                                  f"({self.kind}, {self.steps_per_epoch}); start a new run instead of --resume")
        if self._torch is not None:
            self._torch.load_state_dict(_from_json(state["torch"]))


def make_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> Schedule:
    """The schedule ``cfg.schedule`` over ``cfg.epochs`` epochs of ``steps_per_epoch`` batches each."""
    return Schedule(optimizer, cfg, steps_per_epoch)


_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def _to_json(obj: Any) -> Any:
    """torch scheduler state -> strict JSON: tensors to numbers, tuples to lists, +-inf and nan to strings."""
    if isinstance(obj, dict):
        return {k: _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def _from_json(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_from_json(v) for v in obj]
    return _NONFINITE.get(obj, obj) if isinstance(obj, str) else obj
