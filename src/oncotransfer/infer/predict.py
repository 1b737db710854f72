"""Run a trained model on new images: ``Predictor`` (PyTorch or ONNX Runtime), test-time augmentation, CSV rows."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from oncotransfer.data.images import decode_for_model, normalise, resize_uint8
from oncotransfer.data.readers import MAX_PIXELS, ImageReadError, is_readable_name, known_suffixes
from oncotransfer.data.readers.quality import blank_reason
from oncotransfer.errors import CheckpointError, ConfigError, DataError
from oncotransfer.io import atomic_to_csv, atomic_write_bytes
from oncotransfer.rundir import export_fix, predictions_table, read_export_info, verified_bytes

Engine = Literal["auto", "torch", "onnx"]
DEFAULT_COVERAGE = 0.9
"""``predict --abstain`` and ``serve``: answer this share of in-distribution images, refer the least confident rest."""
ONNX_NAME = "model.onnx"


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def expand_paths(paths: Iterable[str | Path]) -> tuple[list[Path], dict[str, str]]:
    """Files as given, folders walked recursively for the files some reader owns; missing paths become errors."""
    out: list[Path] = []
    errors: dict[str, str] = {}
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_readable_name(f))
            if not found:
                errors[str(p)] = f"{p}: folder holds no images ({', '.join(sorted(known_suffixes()))})"
            out += found
        elif p.is_file():
            out.append(p)
        else:
            errors[str(p)] = f"{p}: no such file or folder"
    return out, errors


class Predictor:
    """A run's classifier, or the ensemble of its fold models, with its own preprocessing; ``engine`` is
    ``torch`` or ``onnx``. Probabilities are calibrated (logits / T) where a temperature was fitted.
    ``model`` is the first member (fold 0 of an ensemble), used for Grad-CAM."""

    def __init__(self, model: torch.nn.Module, meta: dict, engine: str = "torch", session=None,
                 run_dir: Path | None = None, ensemble=None, members: list[dict] | None = None, ood=None):
        from oncotransfer.models.ensemble import Ensemble
        self.model = model.eval()
        self.members = members or [{"fold": int(meta.get("fold") or 0), "temperature": meta.get("temperature")}]
        self.ensemble = (ensemble or Ensemble([self.model], [self.members[0].get("temperature")])).eval()
        self.meta = meta
        self.engine = engine
        self.session = session
        self.run_dir = run_dir
        pre = meta["preprocessing"]
        self.size = int(pre["size"])
        self.mean = tuple(pre["mean"])
        self.std = tuple(pre["std"])
        cfg = meta.get("config") or {}
        self.name = str(cfg.get("name") or meta["backbone"]["name"])
        self.rotation = float(((cfg.get("augment") or {}).get("rotation")) or 0.0)
        # (OODScorer, OODMeta, shift reference features) of models.ood.load_ood, or None (no detector)
        self.ood, self.ood_meta, self.shift_reference = ood if ood is not None else (None, None, None)
        self.fill = str((cfg.get("augment") or {}).get("fill") or "nearest")

    @classmethod
    def from_run(cls, run_dir: str | Path, engine: Engine = "auto", fold: int | None = None) -> "Predictor":
        """Load RUN/checkpoint: the ensemble of every fold model (``fold=None``; one model for a single-fold
        run) or fold ``fold`` alone. ``auto`` uses RUN/export/model.onnx with ONNX Runtime when it exists and
        holds the same members."""
        from oncotransfer.models.ensemble import Ensemble
        from oncotransfer.models.factory import load_members
        run_dir = Path(run_dir)
        if engine not in ("auto", "torch", "onnx"):
            raise ConfigError(f"--engine {engine!r}: expected auto, torch or onnx")
        members, entries, meta = load_members(run_dir, fold)
        info = [{"fold": int(e["fold"]), "temperature": e.get("temperature")} for e in entries]
        meta = {**meta, "fold": info[0]["fold"], "temperature": info[0]["temperature"]}
        ensemble = Ensemble(members, [m["temperature"] for m in info], [f"fold{m['fold']}" for m in info])
        from oncotransfer.models.checkpoint import checkpoint_dir
        from oncotransfer.models.ood import load_ood
        ood = load_ood(checkpoint_dir(run_dir), [m["fold"] for m in info])
        onnx_path = run_dir / "export" / ONNX_NAME
        use_onnx = engine == "onnx" or (engine == "auto" and onnx_path.is_file() and onnx_available()
                                        and _export_members(run_dir) in (None, info)
                                        and _export_ood(run_dir) == _ood_digest(ood))
        session = None
        if use_onnx:
            if not onnx_path.is_file():
                raise CheckpointError(f"{run_dir}: no {onnx_path.relative_to(run_dir)}; run "
                                      f"`oncotransfer export {run_dir} --format onnx` first or use --engine torch")
            _check_export_matches(run_dir, meta, info)
            if _export_ood(run_dir) != _ood_digest(ood):
                raise CheckpointError(f"{run_dir}/export was written without the run's out-of-distribution detector "
                                      f"(or with another one); run `oncotransfer export {run_dir}` again or use "
                                      "--engine torch")
            session = _onnx_session(run_dir, onnx_path)
        return cls(members[0], meta, "onnx" if use_onnx else "torch", session, run_dir, ensemble, info, ood)

    @property
    def temperature(self) -> float | None:
        """The single model's temperature (None: uncalibrated, or an ensemble: see ``members``)."""
        return self.members[0].get("temperature") if len(self.members) == 1 else None

    @property
    def dicom_frames(self) -> str:
        """The run's frame policy for multi-frame DICOM (``middle`` for runs saved before it existed)."""
        return ((self.meta.get("config") or {}).get("data") or {}).get("dicom_frames") or "middle"

    @property
    def us_region(self) -> bool:
        """Crop ultrasound objects to their declared region, as the run's training did (``data.us_region``);
        runs saved before the setting existed trained on whole frames, so they keep whole frames."""
        return ((self.meta.get("config") or {}).get("data") or {}).get("us_region", "off") == "auto"

    @property
    def dicom_frame(self) -> int | None:
        """The frame an uploaded multi-frame object is scored on: N under ``index:N``, else the middle one."""
        p = self.dicom_frames
        return int(p[6:]) if p.startswith("index:") else None

    def describe(self) -> str:
        n = len(self.members)
        return (f"ensemble of {n} fold models (probabilities averaged)" if n > 1
                else f"fold {self.members[0]['fold']} model")

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    # -- preprocessing ---------------------------------------------------------------------------------------
    def to_uint8(self, images: Sequence[Image.Image | torch.Tensor | np.ndarray]) -> torch.Tensor:
        """PIL images or uint8 (3, H, W) tensors -> uint8 (N, 3, size, size), squash-resized like training."""
        out = []
        for im in images:
            if isinstance(im, Image.Image):
                out.append(resize_uint8(im.convert("RGB"), self.size))
                continue
            t = torch.as_tensor(im)
            if t.ndim != 3 or t.shape[0] != 3:
                raise DataError(f"expected a (3, H, W) uint8 image tensor, got shape {tuple(t.shape)}")
            if tuple(t.shape[1:]) != (self.size, self.size):
                t = resize_uint8(Image.fromarray(t.permute(1, 2, 0).to(torch.uint8).numpy()), self.size)
            out.append(t.to(torch.uint8))
        return torch.stack(out) if out else torch.zeros((0, 3, self.size, self.size), dtype=torch.uint8)

    def normalised(self, batch: torch.Tensor) -> torch.Tensor:
        return normalise(batch, self.mean, self.std)

    # -- inference -------------------------------------------------------------------------------------------
    def probabilities(self, x: torch.Tensor, batch_size: int = 32) -> np.ndarray:
        """Normalised float batch -> (N, C) (calibrated, averaged) probabilities with the selected engine."""
        return self.outputs(x, batch_size)[0]

    def outputs(self, x: torch.Tensor, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
        """Normalised float batch -> ((N, C) calibrated averaged probabilities, (N,) out-of-distribution scores
        or None without a detector), from one pass of the selected engine."""
        if len(x) == 0:
            return np.zeros((0, len(self.classes)), np.float32), None if self.ood is None else np.zeros(0)
        if self.session is not None:
            from oncotransfer.runtime import run_session_outputs
            outs = run_session_outputs(self.session, x.numpy(), batch_size)
            return outs[0], (outs[1] if self.ood is not None and len(outs) > 1 else None)
        _, cal, ood = self.score_all(x, batch_size)
        return cal, ood

    def score_all(self, x: torch.Tensor, batch_size: int = 32, features: list | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """PyTorch, one pass: (uncalibrated, calibrated (the same without temperatures), OOD scores or None).
        ``features``: a list that receives the first member's features (the shift check's space), batch by batch."""
        raw, cal, ood = [], [], []
        with torch.inference_mode():
            for s in range(0, len(x), batch_size):
                feats, logits = self.ensemble.member_outputs(x[s:s + batch_size])
                raw.append(self.ensemble.average(logits, False).float())
                cal.append(self.ensemble.average(logits, True).float())
                if self.ood is not None:
                    ood.append(self.ood(feats, logits).double())
                if features is not None:
                    features.append(feats[0].float().numpy())
        if not raw:
            empty = np.zeros((0, len(self.classes)), np.float32)
            return empty, empty, None if self.ood is None else np.zeros(0)
        return (torch.cat(raw).numpy(), torch.cat(cal).numpy(),
                torch.cat(ood).numpy() if self.ood is not None else None)

    def probability_pair(self, x: torch.Tensor, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None]:
        """(uncalibrated, calibrated or None when no member has a temperature) probabilities; PyTorch, one pass."""
        raw, cal, _ = self.score_all(x, batch_size)
        return raw, cal if self.ensemble.calibrated else None

    def in_distribution(self, scores: np.ndarray | None) -> np.ndarray | None:
        """True where the OOD score is at or under the run's threshold; None without a detector or threshold."""
        return None if scores is None or self.ood is None else self.ood.flags(scores)

    def confidence_cut(self, coverage: float) -> float | None:
        """The top-class probability under which images are referred, so that ``coverage`` of the run's
        validation images (each fold model on its own validation subset) are answered; None when unknown."""
        conf = self.ood_meta.confidences if self.ood_meta is not None else []
        if not conf:
            return None
        return float(np.quantile(np.asarray(conf), 1.0 - coverage, method="lower"))

    def tta_views(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """Identity, horizontal and vertical flip, and ± the run's own rotation when it trained with one."""
        views = [batch, batch.flip(-1), batch.flip(-2)]
        if self.rotation > 0:
            from oncotransfer.config import AugmentConfig
            from oncotransfer.data.augment import AugParams, Augmenter
            aug = Augmenter(AugmentConfig(mode="online", rotation=self.rotation, fill=self.fill))
            n = len(batch)
            for sign in (1.0, -1.0):
                p = AugParams.identity(n)
                p = AugParams(**{**p.__dict__, "theta_deg": np.full(n, sign * self.rotation)})
                views.append(aug.apply(batch, p))
        return views

    def referrals(self, probs: np.ndarray, ood: np.ndarray | None, coverage: float = DEFAULT_COVERAGE
                  ) -> tuple[np.ndarray, list[str]]:
        """Which images to refer to a person, and why: out of distribution (when the run has a detector and a
        threshold), or a top-class probability under the cut that answers ``coverage`` of the validation images."""
        refer = np.zeros(len(probs), bool)
        reasons = [[] for _ in range(len(probs))]
        flags = self.in_distribution(ood)
        if flags is not None:
            for i in np.nonzero(~flags)[0]:
                refer[i] = True
                reasons[i].append("out of distribution")
        cut = self.confidence_cut(coverage)
        if cut is not None and len(probs):
            for i in np.nonzero(probs.max(1) < cut)[0]:
                refer[i] = True
                reasons[i].append(f"low confidence (< {cut:.3f})")
        return refer, ["; ".join(r) for r in reasons]

    def predict_uint8(self, batch: torch.Tensor, tta: bool = False) -> np.ndarray:
        return self.predict_with_ood(batch, tta)[0]

    def predict_with_ood(self, batch: torch.Tensor, tta: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 batch -> (probabilities, averaged over the TTA views with ``tta``; OOD scores of the image as
        it is, the view the threshold was set on)."""
        probs, ood = self.outputs(self.normalised(batch))
        if tta:
            probs = np.mean([probs] + [self.probabilities(self.normalised(v)) for v in self.tta_views(batch)[1:]],
                            axis=0)
        return probs, ood

    def predict_images(self, images: Sequence[Image.Image | torch.Tensor], tta: bool = False) -> np.ndarray:
        """Images -> (N, C) class probabilities."""
        return self.predict_uint8(self.to_uint8(images), tta)

    def predict_paths(self, paths: Iterable[str | Path], tta: bool = False, max_pixels: int | None = None
                      ) -> tuple[pd.DataFrame, dict[str, str]]:
        """Files and folders -> (rows: path, pred, prob_<class>...; {path: error} for the unreadable ones and
        those declaring more than ``max_pixels``). Blank inputs are scored and named in
        ``table.attrs["blank"]`` ({path: reason}, ``data.readers.quality``), the CSV's columns unchanged."""
        from oncotransfer.data.frames import frame_paths
        files, errors = expand_paths(paths)
        files = frame_paths(files, self.dicom_frames, errors)
        ok, tensors, blank = [], [], {}
        for f in files:
            try:
                t = decode_for_model(f, self.size, max_pixels, us_region=self.us_region)[1]
            except ImageReadError as e:
                errors[str(f)] = str(e)
                continue
            tensors.append(t)
            ok.append(str(f))
            if why := blank_reason(t.numpy()):  # the model's input, as training checks it
                blank[str(f)] = why
        batch = torch.stack(tensors) if tensors else torch.zeros((0, 3, self.size, self.size), dtype=torch.uint8)
        probs, ood = self.predict_with_ood(batch, tta)
        table = self.frame(ok, probs, ood)
        table.attrs["blank"] = blank
        return table, errors

    def frame(self, paths: list[str], probs: np.ndarray, ood: np.ndarray | None = None) -> pd.DataFrame:
        return predictions_table(paths, probs, self.classes, ood_scores=ood, in_distribution=self.in_distribution(ood))


def _export_members(run_dir: Path) -> list[dict] | None:
    """The members (fold, temperature) the export holds; None for an export written before they were listed."""
    info = read_export_info(run_dir)
    if info is None or info.members is None:
        return None
    return [{"fold": m.fold, "temperature": m.temperature} for m in info.members]


def _ood_digest(ood) -> str | None:
    """The digest of the detector tensors ``load_ood`` read (None: the run has no detector)."""
    return None if ood is None else ood[1].tensors_sha256


def _export_ood(run_dir: Path) -> str | None:
    """The detector digest an export holds (None: an export without an ``ood_score`` output)."""
    info = read_export_info(run_dir)
    ood = (info.ood or {}) if info is not None else {}
    return ood.get("tensors_sha256") if isinstance(ood, dict) else None


def _check_export_matches(run_dir: Path, meta: dict, members: list[dict] | None = None) -> None:
    """An export written before the checkpoint changed (or of other fold models, or temperatures) would
    silently answer for another model."""
    exported = read_export_info(run_dir)
    if exported is not None:
        if exported.classes != meta["classes"] or exported.checkpoint_digest not in (
                None, checkpoint_digest(run_dir)):
            raise CheckpointError(f"{run_dir}/export is stale (classes or weights differ from the checkpoint); "
                                  f"run `oncotransfer export {run_dir}` again or use --engine torch")
        held = _export_members(run_dir)
        if members is not None and held is not None and held != members:
            raise CheckpointError(f"{run_dir}/export holds fold model(s) {[m['fold'] for m in held]} but "
                                  f"{[m['fold'] for m in members]} were asked for; export again with the same "
                                  "--fold or use --engine torch")


def _onnx_session(run_dir: Path, path: Path):
    """An ONNX Runtime session of the export, its file checked against model.json's digest first; a damaged
    file is one line naming it."""
    from oncotransfer.errors import MissingExtraError
    from oncotransfer.runtime import ort_session
    info = read_export_info(run_dir)
    verified_bytes(path, info, "export/model.json", export_fix(run_dir))
    try:
        return ort_session(path)
    except MissingExtraError:
        raise
    except Exception as e:  # onnxruntime raises its own error types for a damaged model
        raise CheckpointError(f"{path}: does not load ({str(e).splitlines()[0][:100]}); the file is damaged: "
                              f"{export_fix(run_dir)}") from None


def checkpoint_digest(run_dir: Path) -> str:
    from oncotransfer.io import sha256_file
    return sha256_file(Path(run_dir) / "checkpoint" / "model.safetensors")


def run_predict(run_dir: str | Path, paths: list[str], out: str | Path, tta: bool = False, explain: bool = False,
                engine: Engine = "auto", fold: int | None = None, max_pixels: int | None = MAX_PIXELS,
                abstain: bool = False, coverage: float = DEFAULT_COVERAGE) -> tuple[pd.DataFrame, dict[str, str]]:
    """The ``predict`` command: CSV at ``out``; with ``explain`` overlays in ``<out stem>_explain/``
    (Grad-CAM of the first member, fold 0, for an ensemble). Images declaring more than ``max_pixels`` are
    refused (listed in the errors) before decoding. ``abstain`` adds ``refer`` and ``refer_reason``
    (``Predictor.referrals`` at ``coverage``)."""
    if not 0 < coverage <= 1:
        raise ConfigError(f"--coverage {coverage:g}: expected a share of images in (0, 1], e.g. 0.9")
    pred = Predictor.from_run(run_dir, engine, fold)
    df, errors = pred.predict_paths(paths, tta=tta, max_pixels=max_pixels)
    if abstain:
        probs = df[[f"prob_{c}" for c in pred.classes]].to_numpy(float)
        ood = df["ood_score"].to_numpy(float) if "ood_score" in df.columns else None
        df["refer"], df["refer_reason"] = pred.referrals(probs, ood, coverage)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_to_csv(df, out, index=False)
    if explain and len(df):
        from oncotransfer.infer.explain import heatmap, overlay_png
        folder = out.parent / f"{out.stem}_explain"
        folder.mkdir(parents=True, exist_ok=True)
        used: set[str] = set()
        for path, label in zip(df["path"], df["pred"]):
            img, t = decode_for_model(path, pred.size, us_region=pred.us_region)
            batch = t.unsqueeze(0)
            heat = heatmap(pred.model, pred.normalised(batch), pred.classes.index(label))
            name = Path(path).stem
            while name in used:  # same file name in two folders: keep both overlays
                name += "_"
            used.add(name)
            atomic_write_bytes(folder / f"{name}.png", overlay_png(img, heat))
    return df, errors
