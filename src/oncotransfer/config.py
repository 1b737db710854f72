"""One typed schema for every run: load YAML, apply ``--set key=value`` overrides, save the resolved config."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from oncotransfer.errors import ConfigError
from oncotransfer.io import atomic_write_text
from oncotransfer.limits import MAX_HEAD_LAYERS, MAX_HEAD_UNITS
from oncotransfer.config_yaml import (anchor_path, anchor_paths, apply_overrides,  # noqa: F401 - public here
                                     parse_value, read_yaml)
from oncotransfer.weight_sources import parse_weights


class _Strict(BaseModel):
    # No NaN or infinity in any number: .inf weight decay or a .nan lr would pass every ge/le bound's spirit.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
"""numpy, torch and scikit-learn all accept seeds in 0..2**32-1."""
SplitSeed = Annotated[int, Field(ge=0, le=2**31 - 1)]
"""Folds use seed + k (k < 50) as scikit-learn random_state, which must stay below 2**32."""


MAX_NAME_CHARS = 200
"""A run folder is named ``<timestamp>_<name>``: file systems allow 255 bytes a name."""


def _run_name(v: str) -> str:
    """Names become folder names under output_dir: a separator or '..' would write outside it, a control
    character would reach terminals and file listings, and a name past 255 bytes cannot be created."""
    if not v.strip() or any(c in v for c in "/\\\0") or ".." in v:
        raise ValueError("must be a plain folder name: no '/', '\\', '..' or empty name (it names a folder "
                         "under output_dir)")
    if any(ord(c) < 32 or ord(c) == 127 for c in v):
        raise ValueError("must not hold control characters (newlines, tabs, terminal escapes)")
    if len(v.encode()) > MAX_NAME_CHARS:
        raise ValueError(f"is {len(v.encode())} bytes long, above the limit of {MAX_NAME_CHARS} (it names a folder)")
    return v


class DataConfig(_Strict):
    path: str | None = None
    """Class-per-folder tree, a manifest CSV, or ``demo:NAME`` for a built-in set."""
    patient_regex: str | None = None
    image_size: int | None = Field(default=None, ge=32, le=1024)
    """Input size; ``None`` takes the backbone's own."""
    dicom_frames: str = "middle"
    """Multi-frame DICOM objects: ``middle`` frame, ``all`` (one row per frame, kept together by patient in
    splits) or ``index:N`` (0-based; objects with fewer frames are skipped with the reason)."""

    @field_validator("dicom_frames")
    @classmethod
    def _frames(cls, v: str) -> str:
        if v in ("middle", "all") or (v.startswith("index:") and v[6:].isdigit()):
            return v  # the same forms as data/dicom.py's parse_frames (config stays free of data imports)
        raise ValueError("expected 'middle', 'all' or 'index:N' (0-based frame of multi-frame objects)")

    us_region: str = "auto"
    """Ultrasound DICOM objects that declare image regions (Sequence of Ultrasound Regions): ``auto`` cuts each
    frame to its largest declared region before anything else, dropping the banners, burned-in text and scales
    around it, in training, predict, serve and Grad-CAM alike; ``off`` keeps the whole frame."""

    @field_validator("us_region", mode="before")
    @classmethod
    def _us_region(cls, v):
        if isinstance(v, bool):  # YAML 1.1 reads a bare off / on as a boolean
            v = "auto" if v else "off"
        if v in ("auto", "off"):
            return v
        raise ValueError("expected 'auto' (crop ultrasound objects to their declared image region) or 'off'")


class SplitConfig(_Strict):
    kind: str = "holdout"
    """holdout | train-val-test | kfold | lopo, or any kind registered in ``data.splits.SPLITTERS``."""
    test_size: float = Field(default=0.1, gt=0, lt=1)
    val_size: float = Field(default=0.2, ge=0, lt=1)
    """train-val-test: fraction for validation (7:2:1 gives 0.2); kfold/lopo: inner validation carved from train
    (a carve that leaves every class in training is preferred)."""
    folds: int = Field(default=5, ge=2, le=50)
    group_by_patient: bool = True
    group_duplicates: bool = True
    allow_image_level_split: bool = False
    seed: SplitSeed = 0


class HeadConfig(_Strict):
    kind: str = "paper_dense"
    """paper_dense | linear | mlp, or any head registered in ``models.heads.HEADS``."""
    hidden: list[Annotated[int, Field(ge=1, le=MAX_HEAD_UNITS)]] = Field(default_factory=lambda: [100],
                                                                         max_length=MAX_HEAD_LAYERS)
    """Units per hidden layer (``oncotransfer.limits.MAX_HEAD_UNITS``, ``MAX_HEAD_LAYERS`` layers at most)."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    sigmoid: bool = False
    """Binary tasks only: one logit with a sigmoid and binary cross-entropy."""


class ModelConfig(_Strict):
    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"
    head: HeadConfig = Field(default_factory=HeadConfig)
    freeze: str = "frozen"
    """frozen | finetune | last:N (the last N coarse groups train) | from:STAGE (e.g. from:blocks.6)."""
    pool_stages: int = Field(default=1, ge=1, le=8)
    """Frozen base: concatenate the pooled outputs of the last k stages (1 = the backbone's own features)."""

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str) -> str:
        parse_weights(v, key=None)  # the message names the key already
        return v

    @field_validator("freeze")
    @classmethod
    def _freeze(cls, v: str) -> str:
        if v in ("frozen", "finetune"):
            return v
        if v.startswith("last:") and v[5:].isdigit() and int(v[5:]) > 0:
            return v
        if v.startswith("from:") and len(v) > 5:
            return v
        raise ValueError("expected 'frozen', 'finetune', 'last:N' with N > 0 or 'from:STAGE' (e.g. from:blocks.6)")

    @model_validator(mode="after")
    def _pool(self) -> "ModelConfig":
        if self.pool_stages > 1 and self.freeze != "frozen":
            raise ValueError("model.pool_stages > 1 needs model.freeze: frozen (pooled stages of a frozen base)")
        return self


class AugmentConfig(_Strict):
    mode: Literal["none", "offline", "online"] = "none"
    copies: int = Field(default=0, ge=0, le=50)
    """offline: augmented copies kept beside each training original; online + frozen cache: views in the bank."""
    rotation: float = Field(default=0.0, ge=0, le=180)
    hflip: bool = False
    vflip: bool = False
    zoom: float = Field(default=0.0, ge=0, le=3)
    zoom_mode: Literal["clamped", "keras"] = "clamped"
    shift: float = Field(default=0.0, ge=0, lt=1)
    brightness: float = Field(default=0.0, ge=0, lt=1)
    fill: Literal["nearest", "constant", "reflect"] = "nearest"
    seed: Seed = 0

    @model_validator(mode="after")
    def _copies(self) -> "AugmentConfig":
        if self.mode == "offline" and self.copies < 1:
            raise ValueError("augment.copies must be >= 1 when augment.mode is 'offline'")
        return self

    @property
    def active(self) -> bool:
        return self.mode != "none" and (self.rotation > 0 or self.hflip or self.vflip or self.zoom > 0
                                         or self.shift > 0 or self.brightness > 0)


class TrainConfig(_Strict):
    optimizer: Literal["adam", "adamw", "adagrad", "sgd"] = "adam"
    lr: float = Field(default=1e-3, gt=0, le=10)
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    """Above 1 the decay step alone shrinks every weight to zero (or overflows) within a few steps."""
    schedule: Literal["constant", "cosine", "onecycle", "plateau"] = "constant"
    """Learning-rate schedule (train/schedule.py): cosine and onecycle step per batch, plateau per epoch."""
    warmup_epochs: float = Field(default=0.0, ge=0)
    """cosine/onecycle: linear warm-up to lr over this many epochs (may be fractional); below train.epochs."""
    min_lr_ratio: float = Field(default=0.0, ge=0, le=1)
    """cosine: the lr at the last batch, as a fraction of lr."""
    plateau_patience: int = Field(default=3, ge=0)
    """plateau: lr × plateau_factor once more than this many epochs in a row fail to lower the validation loss."""
    plateau_factor: float = Field(default=0.5, gt=0, lt=1)
    backbone_lr_mult: float = Field(default=1.0, gt=0, le=1)
    """Discriminative lr: trainable backbone parameters get lr × this, the head gets lr."""
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    """Softmax: CrossEntropyLoss(label_smoothing); one-logit sigmoid: targets y(1-eps) + eps/2."""
    epochs: int = Field(default=30, ge=1, le=10000)
    batch_size: int = Field(default=32, ge=1, le=4096)
    early_stop_patience: int | None = Field(default=None, ge=1)
    class_weights: bool = False
    seed: Seed = 0
    feature_cache: bool = True
    """Frozen base: compute backbone features once per image (and per augmented view)."""
    cache_dir: str | None = None
    tail_cache: bool = True
    """freeze last:N / from:STAGE: compute the frozen prefix's activations once per image and view (fp16, on
    disk) and train only the tail on them; false recomputes the prefix every epoch."""
    cache_memory_mb: int = Field(default=2048, ge=0)
    """Cached activations up to this size are held in memory; larger sets are read from disk per batch."""
    feature_engine: Literal["auto", "torch", "onnx"] = "auto"
    """Frozen-base feature extraction. auto: ONNX Runtime on CPU when it imports (fp32, several times faster than
    eager PyTorch on AVX2 CPUs, features within 1e-5), PyTorch otherwise (GPUs are fast already)."""
    save_every_epoch: bool = True
    """Write resume state after every epoch; grids turn it off (state at the end only) to save per-epoch I/O."""
    fast_cpu: bool = True
    """channels_last + bf16 autocast on CPU for the backbone; turn off for bit-exact fp32."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    """cuda and mps must be present (checked before a run folder is made)."""
    num_workers: int = Field(default=2, ge=0, le=64)


class EvaluateConfig(_Strict):
    positive_classes: list[str] | None = None
    bootstrap: int = Field(default=1000, ge=0, le=100000)
    calibrate: bool = True
    """Temperature scaling, fitted on validation subsets only (never a test fold; none without one)."""
    calibration: Literal["auto", "pooled", "per_fold"] = "auto"
    """One temperature on the pooled validation logits of all folds (``pooled``), one per fold (``per_fold``), or
    per fold only when every fold's validation subset is large enough (``auto``: ``train.temperature.RULE``)."""
    ece_bins: int = Field(default=15, ge=1, le=100)
    """Equal-width confidence bins of the expected calibration error and the reliability diagram."""
    ood: str = "knn"
    """Out-of-distribution detector fitted on each fold's training features: knn | mahalanobis | energy (any name
    in ``models.ood.DETECTORS``), or none."""
    ood_pass_rate: float = Field(default=0.95, ge=0.5, lt=1)
    """Share of each fold's validation images that score at or under the detector's threshold (the rest of the
    validation images, and anything scoring higher, are flagged out of distribution)."""


class StageConfig(_Strict):
    """One stage of a multistage run: anything left out is taken from the top level."""
    name: str
    data: DataConfig | None = None
    split: SplitConfig | None = None
    head: HeadConfig | None = None
    freeze: str | None = None
    augment: AugmentConfig | None = None
    train: TrainConfig | None = None
    evaluate: EvaluateConfig | None = None
    init_from: str | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _run_name(v)


class ExperimentConfig(_Strict):
    name: str = "experiment"
    data: DataConfig = Field(default_factory=DataConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    stages: list[StageConfig] = Field(default_factory=list)
    compare_direct: bool = False
    output_dir: str = Field(default="runs", min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _run_name(v)

    @model_validator(mode="after")
    def _train_combinations(self) -> "ExperimentConfig":
        names = [s.name for s in self.stages]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:  # each stage writes the folder named after it: a second one would overwrite the first
            raise ValueError(f"stages: the name {twice[0]!r} is given to {names.count(twice[0])} stages; give "
                             "every stage its own name")
        problem = train_problem(self.train)
        for stage in self.stages:
            if problem is None and stage.train is not None:  # a stage's train keys lie over the top level's
                merged = self.train.model_copy(update={k: getattr(stage.train, k)
                                                       for k in stage.train.model_fields_set})
                problem = train_problem(merged, f"stage {stage.name!r}: ")
        if problem:
            raise ValueError(problem)
        return self


def train_problem(t: TrainConfig, where: str = "") -> str | None:
    """The first contradictory combination of train keys, as one line naming the key; ``None`` if there is none.

    Checked on the whole config rather than on TrainConfig itself: a stage's train section sets only some keys
    and takes the others (epochs, say) from the top level."""
    if t.warmup_epochs >= t.epochs:
        return f"{where}train.warmup_epochs ({t.warmup_epochs:g}) must be less than train.epochs ({t.epochs})"
    if t.warmup_epochs > 0 and t.schedule not in ("cosine", "onecycle"):
        return (f"{where}train.warmup_epochs applies to train.schedule cosine or onecycle, not {t.schedule!r}; "
                "set train.warmup_epochs=0 or choose one of those schedules")
    if t.schedule == "onecycle" and t.warmup_epochs == 0:
        return (f"{where}train.warmup_epochs must be > 0 with train.schedule onecycle (its rising phase), "
                f"e.g. train.warmup_epochs={0.3 * t.epochs:g}")
    if t.min_lr_ratio > 0 and t.schedule != "cosine":
        return f"{where}train.min_lr_ratio applies to train.schedule cosine only, not {t.schedule!r}"
    return None


def _format_validation(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    if not first["loc"] and first["type"] == "value_error":  # a whole-config check: its message names the keys
        return f"{source}: {first['msg'].removeprefix('Value error, ')}"
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key {key!r}; check its spelling against the documented config keys"
    given = first.get("input")
    shown = f" (got {given!r})" if given is not None and not isinstance(given, dict) else ""
    msg = first["msg"].removeprefix("Value error, ")
    return f"{source}: bad value for {key!r}{shown}: {msg}"


_Model = TypeVar("_Model", bound=BaseModel)


def validate_as(model: type[_Model], raw: Any, source: str) -> _Model:
    """Validate ``raw`` against a pydantic schema (a run config, a grid file); a bad value is one
    ConfigError line naming the key."""
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation(e, source)) from None


def validate(raw: dict[str, Any], source: str = "config") -> ExperimentConfig:
    return validate_as(ExperimentConfig, raw, source)


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, override and validate a YAML config.

    A relative path written in the file is relative to the file's folder; one given on the command line
    (``overrides``: ``--set data.path=X``, ``--data X``) is relative to the current folder."""
    raw = anchor_paths(read_yaml(path), Path(path).resolve().parent)
    return validate(anchor_paths(apply_overrides(raw, overrides or []), Path.cwd()), str(path))


def load_saved_config(path: str | Path) -> ExperimentConfig:
    """A run directory's ``config.yaml`` as it was saved (resolved when the run started; nothing re-anchored)."""
    return validate(read_yaml(path), str(path))


def to_dict(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def with_updates(cfg: ExperimentConfig, updates: dict[str, Any]) -> ExperimentConfig:
    """Return ``cfg`` with dotted-key updates applied and validated again (used by grids and stages)."""
    items = [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
             for k, v in updates.items()]
    return validate(apply_overrides(to_dict(cfg), items), "grid/stage override")
