"""The ``search:`` section of a tune config: what ``oncotransfer tune`` may vary, and how long it may look.

It sits beside the run schema, not inside it: a run's saved config.yaml stays what it was, and a tune config is
a run config (the recipe every trial starts from) plus this section."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from oncotransfer.config import (ExperimentConfig, anchor_paths, apply_overrides, read_yaml, validate,
                                 validate_as)
from oncotransfer.errors import ConfigError

_FREEZE = re.compile(r"^(frozen|pool:[1-8]|last:[1-9]\d*)$")


class SearchSpace(BaseModel):
    """Choices per trial. freeze: frozen | pool:K (frozen, the last K stages pooled) | last:N."""
    model_config = ConfigDict(extra="forbid")
    freeze: list[str] = Field(default=["frozen", "pool:4", "last:1", "last:2"], min_length=1)
    backbone: list[str] = Field(default=["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"],
                                min_length=1)
    """Lite0/1/2 train from their packaged (offline) ImageNet weights; other backbones from model.weights."""
    image_size: list[int] = Field(default=[224], min_length=1)
    views: list[int] = Field(default=[0, 3], min_length=1)
    """Augmented copies per training image (0: none; else augment.mode offline with that many copies)."""
    epochs: list[int] = Field(default=[20, 40], min_length=1)
    lr: tuple[float, float] = (1e-4, 1e-2)
    """Log-uniform range."""
    schedule: list[Literal["constant", "cosine", "onecycle", "plateau"]] = Field(default=["constant", "cosine"],
                                                                                 min_length=1)
    label_smoothing: list[float] = Field(default=[0.0, 0.1], min_length=1)
    head_width: list[int] = Field(default=[0, 100, 256], min_length=1)
    """Hidden units of a one-layer head (0: a linear head)."""

    @field_validator("freeze")
    @classmethod
    def _freeze(cls, v: list[str]) -> list[str]:
        bad = [f for f in v if not _FREEZE.match(f)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a choice; use frozen, pool:K (K 1-8) or last:N")
        return v

    @field_validator("lr")
    @classmethod
    def _lr(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] <= v[1] <= 10:
            raise ValueError("give [low, high] with 0 < low <= high <= 10")
        return v

    @field_validator("image_size", "views", "epochs", "head_width")
    @classmethod
    def _non_negative(cls, v: list[int]) -> list[int]:
        if any(x < 0 for x in v):
            raise ValueError("choices must be >= 0")
        return v


class SearchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    outer_folds: int = Field(default=3, ge=2, le=20)
    """Grouped outer folds: each holds out its test part while the whole search runs on the rest."""
    inner_folds: int = Field(default=3, ge=2, le=20)
    trials: int = Field(default=30, ge=1, le=100000)
    """Trials per search (one per outer fold, one on all data for the final recipe); --trials overrides."""
    ensemble: int = Field(default=3, ge=1, le=10)
    """The model may be the mean of up to this many top trials: each search averages its top 1, 2, ... trials'
    inner-fold predictions and keeps the smallest number that scores best (1: the best trial alone)."""
    budget: str | None = None
    """Wall-clock limit for the whole tune (30m, 2h, 900): split evenly across the searches; --budget overrides."""
    pruner: Literal["successive_halving", "hyperband", "none"] = "successive_halving"
    metric: Literal["accuracy", "balanced_accuracy", "roc_auc"] = "accuracy"
    seed: int = 0
    space: SearchSpace = Field(default_factory=SearchSpace)

    @field_validator("budget")
    @classmethod
    def _budget(cls, v: str | None) -> str | None:
        if v is not None and _seconds(v) is None:
            raise ValueError(_NOT_A_DURATION)
        return v


class _TuneFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    search: SearchConfig = Field(default_factory=SearchConfig)


_NOT_A_DURATION = "not a duration; give e.g. 30m, 2h, 90s or 900 (seconds)"


def _seconds(text: str | int | float) -> float | None:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)] if m else 0.0
    return seconds if seconds > 0 else None


def parse_budget(text: str | int | float, where: str = "--budget") -> float:
    """``30m``, ``2h``, ``90s`` or plain seconds -> seconds; a ConfigError naming ``where`` otherwise."""
    seconds = _seconds(text)
    if seconds is None:
        raise ConfigError(f"{where}: {str(text)!r} is {_NOT_A_DURATION}")
    return seconds


def load_tune_config(path: str | Path, overrides: list[str] | None = None) -> tuple[ExperimentConfig,
                                                                                   SearchConfig]:
    """A tune config: the base run config (validated as ``train`` would) and its ``search:`` section."""
    raw = anchor_paths(read_yaml(path), Path(path).resolve().parent)
    raw: dict[str, Any] = anchor_paths(apply_overrides(raw, overrides or []), Path.cwd())
    search_raw = raw.pop("search", None)
    search = validate_as(_TuneFile, {"search": search_raw or {}}, str(path)).search
    return validate(raw, str(path)), search
