"""Run a trained model on new images: ``Predictor`` (PyTorch or ONNX Runtime), test-time augmentation, CSV rows."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from oncotransfer.data.images import decode_for_model, decode_tensor, normalise, resize_uint8
from oncotransfer.data.readers import MAX_PIXELS, ImageReadError, expand_paths
from oncotransfer.data.readers.quality import blank_reason
from oncotransfer.errors import CheckpointError, ConfigError, DataError
from oncotransfer.infer.sessions import first_line, onnx_available, open_session
from oncotransfer.io import atomic_to_csv, atomic_write_bytes
from oncotransfer.runtables import predictions_table

Engine = Literal["auto", "torch", "onnx"]
DEFAULT_COVERAGE = 0.9
"""``predict --abstain`` and ``serve``: answer this share of in-distribution images, refer the least confident rest."""
ONNX_NAME = "model.onnx"
SCORE_BATCH = 16
"""Images per engine call in ``predict``: small enough that decoding the next batch overlaps scoring this one."""


class Predictor:
    """A run's classifier, or the ensemble of its fold models, with its own preprocessing; ``engine`` is
    ``torch`` or ``onnx``. Probabilities are calibrated (logits / T) where a temperature was fitted.
    ``model`` is the first member (fold 0 of an ensemble), used for Grad-CAM."""

    def __init__(self, model: torch.nn.Module | None, meta: dict, engine: str = "torch", session=None,
                 run_dir: Path | None = None, ensemble=None, members: list[dict] | None = None, ood=None,
                 loader: Callable[[], list[torch.nn.Module]] | None = None):
        self.members = members or [{"fold": int(meta.get("fold") or 0), "temperature": meta.get("temperature")}]
        # ``loader`` builds the PyTorch members on first use of ``model``/``ensemble``: ONNX Runtime needs none
        self._model, self._ensemble, self._loader = model, ensemble, loader
        if model is None and loader is None:
            raise ValueError("Predictor needs a model or a loader of its members")
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
        self.onnx_path: Path | None = None  # the export the session was loaded from

    @property
    def ensemble(self):
        """The PyTorch ensemble of the members (built on first use when the run was loaded for ONNX Runtime)."""
        if self._ensemble is None:
            from oncotransfer.models.ensemble import Ensemble
            from oncotransfer.models.recipes import member_name
            loaded = self._model is None
            members = self._loader() if loaded else [self._model]
            self._model = members[0]
            self._ensemble = Ensemble([m.eval() for m in members],
                                      [m.get("temperature") for m in self.members[:len(members)]],
                                      [member_name(m) for m in self.members] if loaded else None)
            self._ensemble.eval()
        return self._ensemble

    @ensemble.setter
    def ensemble(self, value) -> None:
        self._ensemble = value

    @property
    def model(self) -> torch.nn.Module:
        """The first member (fold 0 of an ensemble), used for Grad-CAM."""
        if self._model is None:
            self.ensemble  # noqa: B018 - builds the members
        return self._model.eval()

    @model.setter
    def model(self, value: torch.nn.Module) -> None:
        self._model = value

    @classmethod
    def from_run(cls, run_dir: str | Path, engine: Engine = "auto", fold: int | None = None,
                 log: Callable[[str], None] | None = None) -> "Predictor":
        """Load RUN/checkpoint: the ensemble of every fold model (``fold=None``; one model for a single-fold
        run) or fold ``fold`` alone. ``auto`` and ``onnx`` score with ONNX Runtime on the run's export
        (``infer.export_cache``: exported on first use, again when stale); where that is impossible ``auto``
        scores with PyTorch and says why in one ``log`` line, and ``onnx`` is a one-line error."""
        from oncotransfer.models.factory import load_members, member_plan
        run_dir = Path(run_dir)
        if engine not in ("auto", "torch", "onnx"):
            raise ConfigError(f"--engine {engine!r}: expected auto, torch or onnx")
        entries, meta = member_plan(run_dir, fold)
        info = [{"fold": int(e["fold"]), "temperature": e.get("temperature"),
                 **({"recipe": int(e["recipe"])} if e.get("recipe") else {})} for e in entries]
        meta = {**meta, "fold": info[0]["fold"], "temperature": info[0]["temperature"]}
        from oncotransfer.models.recipes import load_recipe_ood
        ood = load_recipe_ood(run_dir, meta, info)
        pred = cls(None, meta, "torch", None, run_dir, None, info, ood, loader=lambda: load_members(run_dir, fold)[0])
        if engine != "torch":
            pred._use_onnx(engine, fold, log)
        if pred.session is None:
            pred.ensemble  # noqa: B018 - PyTorch scores: built now, so a damaged fold file is an error here
        return pred

    def _use_onnx(self, engine: str, fold: int | None, log: Callable[[str], None] | None) -> None:
        session, path = self.onnx_session(engine, fold, log)
        if session is not None:
            self.engine, self.session, self.onnx_path = "onnx", session, path

    def onnx_session(self, engine: str, fold: int | None, log: Callable[[str], None] | None,
                     folder: Path | None = None, export: Callable[[Path], object] | None = None):
        """(ONNX Runtime session, model path) of a current export of these models (made now when missing or
        stale; ``folder``/``export`` as ``export_cache.ensure_export``), or (None, None) after saying why in one
        ``log`` line; under ``engine="onnx"`` that reason is a one-line error instead."""
        from oncotransfer.infer.export_cache import ensure_export
        run_dir = self.run_dir
        if not onnx_available():
            why = "onnxruntime is not installed (pip install onnxruntime)"
        else:
            try:
                digest = None if self.ood_meta is None else self.ood_meta.tensors_sha256
                folder = ensure_export(run_dir, fold, self.classes, self.members, digest, log, folder, export)
                return open_session(run_dir, folder / ONNX_NAME), folder / ONNX_NAME
            except OSError as e:  # a read-only run directory, a full disk
                why = f"cannot write {e.filename or run_dir / 'export'} ({e.strerror or e})"
            except Exception as e:  # noqa: BLE001 - a model the exporter cannot trace fails in its own ways
                why = f"the model does not export ({first_line(e)})"
        if engine == "onnx":
            raise CheckpointError(f"--engine onnx: {run_dir}: {why}; use --engine torch")
        if log is not None:
            log(f"note: scoring with PyTorch, not ONNX Runtime: {why}")
        return None, None

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
        from oncotransfer.models.recipes import recipe_count
        n, recipes = len(self.members), recipe_count(self.members)
        if recipes > 1:
            return f"ensemble of {n} models: {recipes} recipes' fold models (probabilities averaged)"
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

    def predict_with_ood(self, batch: torch.Tensor, tta: bool = False, x: torch.Tensor | None = None
                         ) -> tuple[np.ndarray, np.ndarray | None]:
        """uint8 batch -> (probabilities, averaged over the TTA views with ``tta``; OOD scores of the image as
        it is, the view the threshold was set on). ``x``: the batch already normalised."""
        probs, ood = self.outputs(self.normalised(batch) if x is None else x)
        if tta:
            probs = np.mean([probs] + [self.probabilities(self.normalised(v)) for v in self.tta_views(batch)[1:]],
                            axis=0)
        return probs, ood

    def predict_images(self, images: Sequence[Image.Image | torch.Tensor], tta: bool = False) -> np.ndarray:
        """Images -> (N, C) class probabilities."""
        return self.predict_uint8(self.to_uint8(images), tta)

    def predict_paths(self, paths: Iterable[str | Path], tta: bool = False, max_pixels: int | None = None,
                      batch_size: int = SCORE_BATCH) -> tuple[pd.DataFrame, dict[str, str]]:
        """Files and folders -> (rows: path, pred, prob_<class>...; {path: error} for the unreadable ones and
        those declaring more than ``max_pixels``). Blank inputs are scored and named in
        ``table.attrs["blank"]`` ({path: reason}, ``data.readers.quality``), the CSV's columns unchanged.
        Files are decoded ``batch_size`` at a time in reader threads while the engine scores the batch before
        (``infer.slides.prefetch``: at most two batches ahead); rows keep the input order."""
        from oncotransfer.data.frames import frame_paths
        from oncotransfer.infer.slides import prefetch
        files, errors = expand_paths(paths)
        files = frame_paths(files, self.dicom_frames, errors)
        ok: list[str] = []
        blank: dict[str, str] = {}
        probs, oods = [], []
        from oncotransfer.runtime import yield_to_engine
        background = yield_to_engine if self.session is not None else None  # normalising is reading work too
        for names, batch, x, failed, blanks in prefetch(self._decoded(files, max_pixels, batch_size), depth=2,
                                                        init=background):
            errors.update(failed)
            blank.update(blanks)
            if names:
                p, o = self.predict_with_ood(batch, tta, x)
                ok += names
                probs.append(p)
                oods.append(o)
        table = self.frame(ok, np.concatenate(probs) if probs else np.zeros((0, len(self.classes)), np.float32),
                           None if self.ood is None else np.concatenate(oods) if oods else np.zeros(0))
        table.attrs["blank"] = blank
        return table, errors

    def _decoded(self, files: list, max_pixels: int | None, batch_size: int
                 ) -> Iterator[tuple[list[str], torch.Tensor, torch.Tensor, dict[str, str], dict[str, str]]]:
        """(paths decoded, their uint8 batch, the batch normalised, {path: error}, {path: blank reason}) per
        ``batch_size`` files, in order; a file decodes in one of ``usable_cores()`` threads (Pillow releases the
        GIL), and the batch is normalised here too, off the scoring thread. These threads run at a lower
        priority (``runtime.yield_to_engine``) when ONNX Runtime scores on the same cores."""
        from concurrent.futures import ThreadPoolExecutor

        from oncotransfer.runtime import usable_cores, yield_to_engine

        def one(f) -> tuple[torch.Tensor | None, str | None, str | None]:
            try:
                t = decode_tensor(f, self.size, max_pixels, us_region=self.us_region)[1]
            except ImageReadError as e:
                return None, str(e), None
            return t, None, blank_reason(t.numpy())  # the model's input, as training checks it
        background = yield_to_engine if self.session is not None else None
        with ThreadPoolExecutor(max(1, usable_cores()), initializer=background) as pool:
            for s in range(0, len(files), batch_size):
                part = files[s:s + batch_size]
                names, tensors, failed, blanks = [], [], {}, {}
                for f, (t, err, why) in zip(part, pool.map(one, part)):
                    if t is None:
                        failed[str(f)] = err
                        continue
                    names.append(str(f))
                    tensors.append(t)
                    if why:
                        blanks[str(f)] = why
                batch = (torch.stack(tensors) if tensors
                         else torch.zeros((0, 3, self.size, self.size), dtype=torch.uint8))
                yield names, batch, self.normalised(batch), failed, blanks

    def frame(self, paths: list[str], probs: np.ndarray, ood: np.ndarray | None = None) -> pd.DataFrame:
        return predictions_table(paths, probs, self.classes, ood_scores=ood, in_distribution=self.in_distribution(ood))


def run_predict(run_dir: str | Path, paths: list[str], out: str | Path, tta: bool = False, explain: bool = False,
                engine: Engine = "auto", fold: int | None = None, max_pixels: int | None = MAX_PIXELS,
                abstain: bool = False, coverage: float = DEFAULT_COVERAGE, log: Callable[[str], None] | None = None
                ) -> tuple[pd.DataFrame, dict[str, str]]:
    """The ``predict`` command: CSV at ``out``; with ``explain`` overlays in ``<out stem>_explain/``
    (Grad-CAM of the first member, fold 0, for an ensemble). Images declaring more than ``max_pixels`` are
    refused (listed in the errors) before decoding. ``abstain`` adds ``refer`` and ``refer_reason``
    (``Predictor.referrals`` at ``coverage``). ``log``: the engine's line (exporting on first use, or why
    PyTorch scores)."""
    if not 0 < coverage <= 1:
        raise ConfigError(f"--coverage {coverage:g}: expected a share of images in (0, 1], e.g. 0.9")
    pred = Predictor.from_run(run_dir, engine, fold, log=log)
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
