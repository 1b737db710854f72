"""``predict RUN SLIDE --slide``: stream a slide's tissue tiles through the run's ONNX model on CPU.

A reader thread cuts tiles (OpenSlide and Pillow release the GIL) into a bounded queue while ONNX Runtime
scores the previous batch, so memory is a few batches, never the slide. Writes per-tile probabilities (and the
export's out-of-distribution score and verdict), a heatmap on the thumbnail and one slide-level score per slide
with the share of its tiles out of distribution.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
from PIL import Image

from oncotransfer.errors import CheckpointError, ConfigError, DataError
from oncotransfer.evaluate.slides import aggregate, describe_aggregate, parse_aggregate
from oncotransfer.io import atomic_to_csv
from oncotransfer.rundir import read_checkpoint_meta, read_export_info, read_ood_meta


class TileModel:
    """The run's ONNX export on ONNX Runtime (CPU), without PyTorch: the streaming process then needs about
    1 GB less memory (importing torch and building the run's modules cost ~1.1 GB of RSS here). Preprocessing
    is the run's own (squash-resize, [0, 1], (x - mean) / std), in float32 as ``data.images.normalise``."""

    def __init__(self, run_dir: Path, meta: dict, info: dict, threads: int | None = None):
        import os
        import onnxruntime as ort
        self.run_dir, self.meta = run_dir, meta
        pre = info["preprocessing"]
        self.size = int(pre["size"])
        self.mean = np.asarray(pre["mean"], np.float32).reshape(1, 3, 1, 1)
        self.std = np.asarray(pre["std"], np.float32).reshape(1, 3, 1, 1)
        self.classes = list(info["classes"])
        # The options of runtime.ort_session (runtime imports torch, for export): all graph optimisations, a thread per core.
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        opts.log_severity_level = 3
        # Idle intra-op threads sleep instead of spinning: the reader thread needs the cores between batches.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(run_dir / "export" / info["file"]), sess_options=opts,
                                            providers=["CPUExecutionProvider"])
        self._input = self.session.get_inputs()[0].name
        # The out-of-distribution output by its name in model.json (None: an export of a run without a detector)
        ood = info.get("ood") or {}
        self.ood_output: str | None = ood.get("output")
        self.ood_threshold: float | None = ood.get("threshold")
        names = [o.name for o in self.session.get_outputs()]
        if self.ood_output is not None and self.ood_output not in names:
            raise CheckpointError(f"{run_dir}/export: model.json names the output {self.ood_output!r} but the "
                                  f"model has {names}; run `oncotransfer export {run_dir}` again")
        self._outputs = [names[0]] + ([self.ood_output] if self.ood_output else [])

    def normalised(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float32 (N, 3, H, W), the same float32 operations as training."""
        x = batch.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255)
        return np.ascontiguousarray((x - self.mean) / self.std)

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        return self.outputs(x)[0]

    def outputs(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, C) probabilities and (N,) out-of-distribution scores (None without a detector), one pass."""
        out = self.session.run(self._outputs, {self._input: x})
        return out[0], (np.asarray(out[1], np.float64).reshape(-1) if self.ood_output else None)

    def in_distribution(self, scores: np.ndarray | None) -> np.ndarray | None:
        """True where the score is at or under the export's threshold; None without a detector or threshold."""
        return None if scores is None or self.ood_threshold is None else np.asarray(scores) <= self.ood_threshold


def tile_model(run_dir: str | Path, log: Callable[[str], None] | None = None) -> TileModel:
    """The run's ``TileModel``: its ONNX export of every fold model (the ensemble), exported now (parity
    checked against PyTorch, as ``oncotransfer export``) when missing or stale (``infer.export_cache``)."""
    from oncotransfer.infer.export_cache import ensure_export, run_members
    run_dir = Path(run_dir)
    if not (run_dir / "checkpoint" / "meta.json").is_file():
        raise CheckpointError(f"{run_dir}: no checkpoint (checkpoint/model.safetensors + meta.json); give a run "
                              "directory written by `oncotransfer train`")
    meta = read_checkpoint_meta(run_dir / "checkpoint").content()
    members = run_members(run_dir, meta)
    ood = read_ood_meta(run_dir / "checkpoint")
    try:
        folder = ensure_export(run_dir, None, meta["classes"], members, None if ood is None else ood.tensors_sha256,
                               log)
    except OSError as e:  # no PyTorch fallback here: streaming slides is ONNX Runtime's job
        raise CheckpointError(f"{run_dir}: cannot write the ONNX export {e.filename or 'export/'} "
                              f"({e.strerror or e}); export it where it can be written, or copy the run") from None
    return TileModel(run_dir, meta, read_export_info(run_dir, folder.relative_to(run_dir)).content())


def training_tiling(meta: dict) -> dict:
    """tiling.json of the data the run trained on (written by ``slides tile``), or {} when there is none:
    predict then cuts tiles at the same size and resolution as training by default."""
    path = ((meta.get("config") or {}).get("data") or {}).get("path")
    if not path or str(path).startswith("demo:"):
        return {}
    from oncotransfer.data.slides import read_tiling
    p = Path(path).expanduser()
    f = (p.parent if p.is_file() else p) / "tiling.json"
    # Data moved or never a slide set: the defaults. A damaged one is an error (read_tiling), never the defaults.
    return read_tiling(f) if f.is_file() else {}


def prefetch(batches: Iterator, depth: int = 3, init: Callable[[], None] | None = None) -> Iterator:
    """Run ``batches`` in a reader thread, at most ``depth`` batches ahead (bounded memory); ``init`` runs first
    in that thread (e.g. lowering its priority), never in the caller's."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def reader() -> None:
        try:
            if init is not None:
                init()
            for b in batches:
                while not stop.is_set():
                    try:
                        q.put(b, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)
    t = threading.Thread(target=reader, daemon=True, name="slide-reader")
    t.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        t.join(timeout=5)


@dataclass
class SlideResult:
    slide: str
    tiles: pd.DataFrame
    probs: np.ndarray
    heatmap: Path | None
    tiles_csv: Path


def heatmap_png(thumb: Image.Image, geom, tiles: pd.DataFrame, score: np.ndarray, label: str, path: Path) -> Path:
    """Tile scores (0..1, viridis) blended over the thumbnail, glass left as is, with a colour bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    base = np.asarray(thumb, dtype=np.float32) / 255
    over = base.copy()
    alpha = np.zeros(base.shape[:2], np.float32)
    sx, sy = thumb.width / geom.width, thumb.height / geom.height
    cmap = matplotlib.colormaps["viridis"]
    for x, y, s in zip(tiles["x"], tiles["y"], score):
        x0, y0 = int(x * sx), int(y * sy)
        x1, y1 = max(x0 + 1, int((x + geom.size0) * sx)), max(y0 + 1, int((y + geom.size0) * sy))
        over[y0:y1, x0:x1] = cmap(float(s))[:3]
        alpha[y0:y1, x0:x1] = 0.55
    img = base * (1 - alpha[..., None]) + over * alpha[..., None]
    h, w = img.shape[:2]
    fig, ax = plt.subplots(figsize=(8, 8 * h / w + 0.6), dpi=max(100, int(w / 8)))
    ax.imshow(img)
    ax.set_axis_off()
    fig.colorbar(matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(0, 1), cmap), ax=ax, fraction=0.04,
                 label=f"P({label})")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def score_slide(pred: TileModel, path: Path, tile_size: int, mpp: float | None, magnification: float | None,
                mpp_source: float | None, min_tissue: float, batch_size: int = 16, depth: int = 3,
                tissue: str = "auto", facts: dict | None = None
                ) -> tuple[pd.DataFrame, np.ndarray, object, Image.Image]:
    """Tile probabilities of one slide: (rows slide,x,y,tissue,pred,prob_<class>[,ood_score,in_distribution],
    (N, C) probs, geometry, thumbnail). Tiles are read at ``tile_size`` and squash-resized to the model's size as
    in training; ``in_distribution`` is empty when the export has no threshold. ``facts`` receives the tissue
    mask's mode, threshold and fraction."""
    from oncotransfer.data import slides as S
    slide = S.open_slide(path)
    try:
        geom, thumb, coords, found = S.slide_tiles(slide, path, tile_size, mpp, magnification, mpp_source,
                                                   min_tissue, tissue)
        if facts is not None:
            facts.update(found)

        def batches():
            for part, arr in S.iter_tiles(slide, geom, coords, batch_size):
                if geom.tile != pred.size:  # training's PNG tiles went through this resize (images.resize_uint8)
                    arr = np.stack([np.asarray(Image.fromarray(a).resize((pred.size, pred.size), Image.BILINEAR,
                                                                          reducing_gap=None)) for a in arr])
                yield part, pred.normalised(arr)
        out, ood = [], []
        for part, x in prefetch(batches(), depth):
            p, s = pred.outputs(x)
            out.append(p)
            ood.append(s)
    finally:
        slide.close()
    probs = np.concatenate(out) if out else np.zeros((0, len(pred.classes)), np.float32)
    df = pd.DataFrame({"slide": geom.slide, "x": [c[0] for c in coords], "y": [c[1] for c in coords],
                       "tissue": [round(c[2], 4) for c in coords],
                       "pred": [pred.classes[k] for k in probs.argmax(1)] if len(probs) else []})
    for c, name in enumerate(pred.classes):
        df[f"prob_{name}"] = probs[:, c] if len(probs) else []
    if pred.ood_output:
        scores = np.concatenate(ood) if ood else np.zeros(0)
        flags = pred.in_distribution(scores)
        df["ood_score"] = scores
        df["in_distribution"] = pd.Series([None] * len(df) if flags is None else list(flags), dtype=object)
    return df, probs, geom, thumb


def predict_slides(run_dir: str | Path, sources: list[str], out: str | Path, aggregate_spec: str = "mean",
                   tile_size: int | None = None, mpp: float | None = None, magnification: float | None = None,
                   mpp_source: float | None = None, min_tissue: float | None = None, batch_size: int = 16,
                   log: Callable[[str], None] | None = None, tissue: str | None = None
                   ) -> tuple[pd.DataFrame, dict[str, str]]:
    """The ``predict --slide`` command. ``out``: one row per slide (slide, tiles, aggregate, pred,
    prob_<class>, and ``ood_tiles``, the share of tiles out of distribution, when the run has a detector);
    beside it ``<out stem>_slides/<slide>_tiles.csv`` and ``<slide>_heatmap.png``. Tiling
    defaults come from the run's training tiles (tiling.json), else the model's input size at 0.5 µm/px.
    Batches of 16: ONNX Runtime's arena for a batch of 32 224-px images alone holds about 0.8 GB.
    When no slide could be scored, the (first) reason is raised: one line, exit nonzero."""
    from oncotransfer.data.slides import TISSUE_MODES, SlideError, find_slides, reading
    parse_aggregate(aggregate_spec)
    if tissue is not None and tissue not in TISSUE_MODES:
        raise ConfigError(f"--tissue {tissue}: expected one of {' | '.join(TISSUE_MODES)}")
    say = log or (lambda s: None)
    pred = tile_model(run_dir, say)
    classes = pred.classes
    positive = ((pred.meta.get("config") or {}).get("evaluate") or {}).get("positive_classes")
    trained = training_tiling(pred.meta)
    if mpp is None and magnification is None:
        mpp, magnification = trained.get("mpp"), trained.get("magnification")
    tile_size = int(tile_size or trained.get("tile_size") or pred.size)
    min_tissue = float(trained.get("min_tissue", 0.5) if min_tissue is None else min_tissue)
    tissue = tissue or trained.get("tissue") or "auto"
    paths, errors, skipped = [], {}, {}
    for s in sources:
        try:
            paths += find_slides(s, skipped)
        except DataError as e:
            errors[s] = str(e)
    for f, why in skipped.items():
        say(f"skipped {f}: {why}")
    out = Path(out)
    folder = out.parent / f"{out.stem}_slides"
    folder.mkdir(parents=True, exist_ok=True)
    from oncotransfer.evaluate.metrics import resolve_positive
    pos = resolve_positive(classes, positive)
    score_of = [classes.index(p) for p in pos] if pos else None
    rows, seen, warned = [], set(), set()
    for path in paths:
        if path.stem in seen:  # its outputs would overwrite the first one's
            errors[str(path)] = f"{path}: a slide named {path.stem!r} was already scored; rename one of them"
            continue
        seen.add(path.stem)
        facts: dict = {}
        try:
            with reading(path):
                df, probs, geom, thumb = score_slide(pred, path, tile_size, mpp, magnification, mpp_source,
                                                     min_tissue, batch_size, tissue=tissue, facts=facts)
        except SlideError as e:
            errors[str(path)] = str(e)
            continue
        warn = resolution_warning(geom, trained)
        if warn and warn not in warned:
            warned.add(warn)
            say(warn)
        atomic_to_csv(df, folder / f"{geom.slide}_tiles.csv", index=False)
        if len(probs) == 0:
            errors[str(path)] = f"{path}: no tissue tile found (min tissue {min_tissue:g}); lower --min-tissue"
            continue
        score = probs[:, score_of].sum(1) if score_of else probs.max(1)
        heatmap_png(thumb, geom, df, score, " + ".join(pos) if pos else "predicted class",
                    folder / f"{geom.slide}_heatmap.png")
        p = aggregate(probs, classes, aggregate_spec, positive)
        rows.append({"slide": geom.slide, "path": str(path), "tiles": len(probs), "aggregate": aggregate_spec,
                     "pred": classes[int(np.argmax(p))], **{f"prob_{c}": float(v) for c, v in zip(classes, p)}})
        at = f"{geom.mpp:g} µm/px" if geom.mpp else f"downsample {geom.downsample:g}"
        line = (f"{path.name}: {len(probs)} tiles at {at}, {facts['tissue']} tissue mask -> "
                f"{rows[-1]['pred']} ({describe_aggregate(aggregate_spec, classes, positive)})")
        if pred.ood_output:
            rows[-1]["ood_tiles"], line = _ood_share(df, line)
        say(line)
    summary = pd.DataFrame(rows, columns=["slide", "path", "tiles", "aggregate", "pred",
                                          *[f"prob_{c}" for c in classes],
                                          *(["ood_tiles"] if pred.ood_output else [])])
    if not rows and errors:  # nothing scored: the reason is the command's one-line error
        first = next(iter(errors.values()))
        raise DataError(first if len(errors) == 1 else f"no slide could be scored ({len(errors)} failed), e.g. {first}")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_to_csv(summary, out, index=False)
    return summary, errors


def resolution_warning(geom, trained: dict) -> str | None:
    """A warning line when the slide's tiles are cut at another µm/px than the run's training tiles (more than 5%
    apart): a model sees cells at one size, and at another its probabilities are not what validation measured."""
    want = trained.get("mpp")
    if not want:  # trained at a magnification or not on slide tiles: its resolution is not known here
        mpps = {s.get("mpp") for s in trained.get("slides") or [] if s.get("mpp")}
        want = mpps.pop() if len(mpps) == 1 else None
    if not want or not geom.mpp or abs(geom.mpp / want - 1) <= 0.05:
        return None
    return (f"warning: tiles cut at {geom.mpp:g} µm/px, but the run trained on tiles at {want:g} µm/px; its "
            f"probabilities are only validated at {want:g} µm/px (omit --mpp/--magnification to use it)")


def _ood_share(tiles: pd.DataFrame, line: str) -> tuple[float, str]:
    """The share of a slide's tiles out of distribution (NaN without a threshold) and the log line saying it:
    tiles unlike the training tiles (other tissue, stain, scanner, pen marks) make the slide score doubtful."""
    flags = tiles["in_distribution"]
    if flags.isna().any():
        return float("nan"), line + "; out-of-distribution threshold not set (scores only)"
    out = int((~flags.astype(bool)).sum())
    share = out / max(1, len(flags))
    return share, line + f"; {100 * share:.0f}% of tiles out of distribution ({out} of {len(flags)})"
