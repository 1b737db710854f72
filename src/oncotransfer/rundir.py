"""Leaf module: the typed run directory. ``run.json`` (``RunInfo``), ``checkpoint/meta.json``
(``CheckpointMeta``) and ``metrics.json`` (``Metrics``) are written atomically and read here alone, and
``run_finished`` says what a finished run directory is.

Layouts: 1 is every run directory written before the files carried a ``layout`` field (read as is: the keys
are the same); 2 adds ``layout`` to each file and writes ``metrics.json`` last, after the plots and reports,
recording in ``report`` whether they were written. A run directory of a newer layout is refused in one line.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from oncotransfer.errors import CheckpointError, RunLayoutError
from oncotransfer.io import write_json

LAYOUT = 2
RUN_INFO, METRICS, META = "run.json", "metrics.json", "meta.json"


def _temperature(t: float | None) -> float | None:
    # a temperature of 0 or NaN gives empty probabilities, a negative one flips every prediction
    if t is not None and not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature {t!r}: expected a finite number > 0")
    return t


Temperature = Annotated[float | None, AfterValidator(_temperature)]
Sha256 = Annotated[str, Field(pattern="^[0-9a-f]{64}$")]
ClassName = Annotated[str, Field(min_length=1)]


def _unique(values: list, what: str) -> list:
    if len(set(values)) != len(values):
        raise ValueError(f"{what} named twice: {sorted({v for v in values if values.count(v) > 1})}")
    return values


class _RunFile(BaseModel):
    """Known keys typed; unknown ones kept as they are, so files from other versions round-trip."""
    model_config = ConfigDict(extra="allow")
    layout: int = 1  # missing: written before layouts were numbered (layout 1)
    _bookkeeping: ClassVar[set[str]] = {"layout"}

    def content(self) -> dict[str, Any]:
        """The file's keys as a plain dict, without the layout bookkeeping (what callers had from json.loads)."""
        return self.model_dump(exclude_unset=True, exclude=self._bookkeeping)


class RunInfo(_RunFile):
    """``run.json``: what the run was (data, protocol, device) and how it went (best epochs, time, warnings)."""
    name: str | None = None
    classes: list[str] | None = None
    n_images: int | None = None
    protocol: dict[str, Any] | None = None
    best_epochs: dict[str, int | None] | None = None
    seconds: float | None = None
    device: str | None = None
    precision: str | None = None
    weights: str | None = None
    backbone: str | None = None
    warnings: list[Any] | None = None
    skipped: dict[str, str] | None = None
    checkpoint: str | None = None
    temperatures: dict[str, Temperature] | None = None
    calibration: dict[str, Any] | None = None
    processes: int | None = None


class FileDigest(BaseModel):
    """What a run directory holds a file as: its sha256 and size, checked by ``verified_bytes`` on every read."""
    model_config = ConfigDict(extra="allow")
    sha256: Sha256 | None = None  # None: written before files carried digests (read unchecked)
    bytes: int | None = Field(default=None, ge=0)


class FoldEntry(FileDigest):
    """One fold model of ``meta.json``'s ``folds``: its file (relative to ``checkpoint/``, never outside it)."""
    fold: int = Field(ge=0)
    file: str = Field(pattern=r"^(model\.safetensors|folds/fold[0-9]+\.safetensors)$")
    temperature: Temperature = None


class RecipeEntry(BaseModel):
    """One more recipe of an ensemble of recipes (``models.recipes``): its checkpoint folder (``recipes/R``
    inside ``checkpoint/``, never outside it) and the digests of its meta.json and ood.json (None: none)."""
    model_config = ConfigDict(extra="allow")
    dir: str = Field(pattern=r"^recipes/[1-9][0-9]{0,2}$")
    meta_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    ood_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")


class Preprocessing(BaseModel):
    model_config = ConfigDict(extra="allow")
    size: int = Field(ge=8, le=4096)
    mean: list[float] = Field(min_length=3, max_length=3)
    std: list[float] = Field(min_length=3, max_length=3)

    @model_validator(mode="after")
    def _finite(self) -> "Preprocessing":
        if not all(math.isfinite(v) for v in self.mean) or not all(math.isfinite(v) and v > 0 for v in self.std):
            raise ValueError(f"mean {self.mean} / std {self.std}: expected finite numbers, std > 0")
        return self


class BackboneInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1)


def _checked(model: type[BaseModel]) -> AfterValidator:
    """Validate a block against ``model`` but keep it the plain dict callers read (``meta.preprocessing["size"]``)."""
    return AfterValidator(lambda d: (model.model_validate(d), d)[1])


class CheckpointMeta(_RunFile):
    """``checkpoint/meta.json``: everything needed to rebuild the classifier beside ``model.safetensors``,
    with the digest of every model file it names (``folds``)."""
    format: str = "oncotransfer-checkpoint/1"
    version: str | None = None
    classes: Annotated[list[ClassName], Field(min_length=1), AfterValidator(lambda v: _unique(v, "class"))]
    backbone: Annotated[dict[str, Any], _checked(BackboneInfo)]
    head: dict[str, Any] | None = None
    freeze: str | None = None
    weights: dict[str, Any] | None = None
    preprocessing: Annotated[dict[str, Any], _checked(Preprocessing)]
    config: dict[str, Any] | None = None
    fold: int | None = Field(default=None, ge=0)
    n_folds: int | None = Field(default=None, ge=1)
    temperature: Temperature = None
    folds: Annotated[list[FoldEntry], Field(min_length=1)] | None = None
    recipes: list[RecipeEntry] | None = None
    """Further recipes whose fold models the run's model averages with its own (``models.recipes``)."""

    @model_validator(mode="after")
    def _distinct_folds(self) -> "CheckpointMeta":
        # one file listed for two folds is an ensemble holding one model twice
        if self.folds:
            _unique([e.fold for e in self.folds], "fold")
            _unique([e.file for e in self.folds], "file")
        if self.recipes:
            _unique([e.dir for e in self.recipes], "recipe folder")
        return self


class OODMember(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fold: int = Field(ge=0)
    threshold: Annotated[float, Field(allow_inf_nan=False)] | None
    """The score that ``pass_rate`` of this fold's validation images stay under; None without a validation subset."""
    n_fit: int
    n_val: int


class OODMeta(_RunFile):
    """``checkpoint/ood.json``: the out-of-distribution detector of each fold model; its tensors (a k-NN bank, class
    means and a precision matrix) are ``checkpoint/ood.safetensors`` as ``fold{k}.<name>``, checked by digest."""
    format: str = "oncotransfer-ood/1"
    detector: str
    pass_rate: float = Field(gt=0, lt=1)
    params: dict[str, Any] = {}
    members: list[OODMember]
    features: str
    """What the detector reads: the features each fold model's head reads."""
    confidences: list[float] = []
    """Calibrated top-class probabilities of the validation images (each fold model on its own validation
    subset), sorted: the confidence cut of ``predict --abstain`` for a coverage is read off them."""
    reference: dict[str, Any] | None = None
    """Which images ``shift.reference`` holds (the dataset-shift check of ``evaluate --data``)."""
    thresholds: dict[str, Any] | None = None
    """How the thresholds were set: ``pooled`` (one from all folds' validation scores), the per-fold values it
    replaced, and the number of validation images."""
    tensors_sha256: Sha256


OOD_META = "ood.json"


def read_ood_meta(checkpoint_dir: str | Path) -> OODMeta | None:
    """``ood.json`` in ``checkpoint_dir``, or None for a run trained without (or before) a detector."""
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / OOD_META).is_file():
        return None
    return _read(checkpoint_dir / OOD_META, OODMeta, checkpoint_dir)


def write_ood_meta(checkpoint_dir: str | Path, meta: OODMeta | dict[str, Any]) -> dict[str, Any]:
    data = _dump(meta, OODMeta)
    write_json(Path(checkpoint_dir) / OOD_META, data)
    return data


EXPORT_INFO = "model.json"


class ExportMember(BaseModel):
    model_config = ConfigDict(extra="allow")
    fold: int = Field(ge=0)
    temperature: Temperature = None


class ExportInfo(FileDigest, _RunFile):
    """``export/model.json``: what ``export`` wrote (``file``, with its digest) and from which checkpoint."""
    format: Literal["onnx", "torchscript"]
    file: Literal["model.onnx", "model.ts"]
    classes: Annotated[list[ClassName], Field(min_length=1)]
    checkpoint_digest: Sha256 | None = None
    members: Annotated[list[ExportMember], Field(min_length=1)] | None = None
    temperature: Temperature = None
    ood: dict[str, Any] | None = None


def export_fix(run_dir: Path) -> str:
    return f"run `oncotransfer export {run_dir}` again (or use --engine torch)"


def read_export_info(run_dir: str | Path, folder: str | Path = "export") -> ExportInfo | None:
    """``RUN/export/model.json`` (or ``RUN/<folder>/model.json``), validated; None when there is none."""
    path = Path(run_dir) / folder / EXPORT_INFO
    if not path.is_file():
        return None
    return _read(path, ExportInfo, Path(run_dir), export_fix(Path(run_dir)))


def file_digest(path: str | Path) -> dict[str, Any]:
    """``{"sha256", "bytes"}`` of a file, as ``FileDigest`` records it."""
    data = Path(path).read_bytes()
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def verified_bytes(path: Path, digest: FileDigest | dict | None, described_by: str, fix: str) -> bytes:
    """The content of ``path``, read once, after checking it against the digest its metadata recorded: a file
    cut short, damaged, or replaced by another (a fold file copied over another fold's) is one line naming it
    and how to rebuild it. No digest (files written before digests): the content as it is."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (named by {described_by}); copy the whole run directory, "
                              f"or {fix}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e}); {fix}") from None
    d = FileDigest.model_validate(digest) if isinstance(digest, dict) else (digest or FileDigest())
    if d.bytes is not None and len(data) != d.bytes:
        raise CheckpointError(f"{path}: {len(data)} bytes where {described_by} records {d.bytes} (cut short or "
                              f"replaced); the file is damaged: {fix}")
    if d.sha256 is not None and hashlib.sha256(data).hexdigest() != d.sha256:
        raise CheckpointError(f"{path}: content differs from the sha256 {described_by} records (damaged, or "
                              f"replaced by another file); {fix}")
    return data


def tensors_from_bytes(data: bytes, path: Path, fix: str) -> dict[str, Any]:
    """Parse safetensors ``data`` read from ``path``; a file that does not parse is one line naming it."""
    from safetensors.torch import load
    try:
        if len(data) < 8 or int.from_bytes(data[:8], "little") > len(data) - 8:
            raise ValueError("cut short: the header is longer than the file")
        return load(data)
    except Exception as e:  # safetensors raises its own error types (and a Rust panic type) for damaged files
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0][:100]}); "
                              f"the file is damaged: {fix}") from None


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors ``data`` that ``tensors_from_bytes`` parsed ({} when it has none)."""
    try:
        meta = json.loads(data[8:8 + int.from_bytes(data[:8], "little")]).get("__metadata__")
    except (ValueError, AttributeError):
        return {}
    return meta if isinstance(meta, dict) else {}


class Metrics(_RunFile):
    """``metrics.json``: the top-level blocks typed, the nested metrics dicts as ``evaluate.metrics`` makes them."""
    name: str | None = None
    classes: list[str] | None = None
    protocol: dict[str, Any] | None = None
    pooled: dict[str, Any]
    per_fold: dict[str, dict[str, Any]] | None = None
    folds: dict[str, Any] | None = None
    calibration: dict[str, Any] | None = None
    scored_by: str | None = None
    ood: dict[str, Any] | None = None
    shift: dict[str, Any] | None = None
    report: bool | None = None  # layout 2: report.md/.html (and plots) were written before this file
    _bookkeeping: ClassVar[set[str]] = {"layout", "report"}


RETRAIN = "re-run training (or `train --resume RUN_DIR`) to rewrite it"


def _read(path: Path, model: type[_RunFile], run_dir: Path, fix: str = RETRAIN) -> Any:
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{run_dir}: no {path.name}; this is not a finished run, train first "
                              "(oncotransfer train CONFIG) and give its run directory") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({getattr(e, 'msg', e)}); the file is damaged: "
                              f"{fix}") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e}); {fix}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object; the file is damaged: {fix}")
    layout = raw.get("layout", 1)
    if isinstance(layout, int) and not isinstance(layout, bool) and layout > LAYOUT:
        raise RunLayoutError(f"{run_dir}: written by a newer oncotransfer (run directory layout {layout}; this "
                             f"version reads layouts up to {LAYOUT}): upgrade oncotransfer "
                             "(pip install -U oncotransfer) to read it")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise CheckpointError(f"{path}: {key}: {err['msg']}; the file is damaged or was edited by hand: "
                              f"{fix}") from None


def _dump(obj: _RunFile | dict[str, Any], model: type[_RunFile]) -> dict[str, Any]:
    """The keys given (validated), plus ``layout``: files keep the content they always had."""
    data = obj.model_dump(exclude_unset=True) if isinstance(obj, BaseModel) else dict(obj)
    data.pop("layout", None)
    model.model_validate(data)  # a writer bug fails here, before a file exists
    return {"layout": LAYOUT, **data}


def read_run_info(run_dir: str | Path) -> RunInfo:
    run_dir = Path(run_dir)
    return _read(run_dir / RUN_INFO, RunInfo, run_dir)


def write_run_info(run_dir: str | Path, info: RunInfo | dict[str, Any]) -> dict[str, Any]:
    data = _dump(info, RunInfo)
    write_json(Path(run_dir) / RUN_INFO, data)
    return data


def read_checkpoint_meta(checkpoint_dir: str | Path) -> CheckpointMeta:
    """``meta.json`` in ``checkpoint_dir`` (``RUN/checkpoint`` or a bare checkpoint folder)."""
    checkpoint_dir = Path(checkpoint_dir)
    return _read(checkpoint_dir / META, CheckpointMeta, checkpoint_dir)


def write_checkpoint_meta(checkpoint_dir: str | Path, meta: CheckpointMeta | dict[str, Any]) -> dict[str, Any]:
    data = _dump(meta, CheckpointMeta)
    write_json(Path(checkpoint_dir) / META, data)
    return data


def metrics_file(run_dir: str | Path, suffix: str = "") -> Path:
    """``metrics.json``, or ``metrics_<suffix>.json`` for an evaluation on other data."""
    return Path(run_dir) / (f"metrics_{suffix}.json" if suffix else METRICS)


def read_metrics(run_dir: str | Path, suffix: str = "") -> Metrics:
    run_dir = Path(run_dir)
    return _read(metrics_file(run_dir, suffix), Metrics, run_dir)


def write_metrics(run_dir: str | Path, metrics: Metrics | dict[str, Any], report: bool, suffix: str = "") -> dict:
    """Write the metrics file last of a run's results: with it in place, the run is finished (``run_finished``)."""
    data = _dump(metrics, Metrics)
    data["report"] = report
    write_json(metrics_file(run_dir, suffix), data)
    return data


def mark_unfinished(run_dir: str | Path, suffix: str = "") -> None:
    """Remove the metrics file before results are rewritten, so a kill part-way leaves no finished marker
    beside old or half-replaced results."""
    metrics_file(run_dir, suffix).unlink(missing_ok=True)


def run_finished(run_dir: str | Path, report: bool = False) -> bool:
    """True when the run's results are complete: ``metrics.json`` is in place (written last, atomically) and
    holds the pooled result; with ``report=True`` its report must have been written too. A layout-1 run
    (metrics written before the report) counts as reported when report.md and report.html are both there.
    A run directory of a newer layout raises ``RunLayoutError`` rather than being redone over."""
    try:
        m = read_metrics(run_dir)
    except RunLayoutError:
        raise
    except (CheckpointError, OSError):
        return False
    if not report:
        return True
    if m.layout >= 2 and not m.report:
        return False  # written by a run that made no report (a grid without run_reports)
    # and the files themselves: a report removed since (or a layout-1 run killed before it) is not finished
    return all((Path(run_dir) / f).is_file() for f in ("report.md", "report.html"))
