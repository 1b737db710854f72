"""``predict RUN SLIDE --slide``: stream a slide's tissue tiles through the run's ONNX model on CPU.

A reader thread cuts tiles (OpenSlide and Pillow release the GIL) into a bounded queue while ONNX Runtime
scores the previous batch, so memory is a few batches, never the slide. Writes per-tile probabilities, a
heatmap on the thumbnail and one slide-level score per slide.
"""
from __future__ import annotations

import json
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch
from PIL import Image

from oncotransfer.errors import DataError
from oncotransfer.evaluate.slides import aggregate, describe_aggregate, parse_aggregate


def onnx_predictor(run_dir: str | Path, log: Callable[[str], None] | None = None):
    """The run's ``Predictor`` on ONNX Runtime: its export when it holds the run's models, else exported now
    (with the usual parity check against PyTorch)."""
    from oncotransfer.infer.predict import Predictor
    pred = Predictor.from_run(run_dir, "auto")
    if pred.session is None:
        from oncotransfer.infer.export import export_run
        export_run(run_dir, "onnx", log=log)
        pred = Predictor.from_run(run_dir, "onnx")
    return pred


def training_tiling(meta: dict) -> dict:
    """tiling.json of the data the run trained on (written by ``slides tile``), or {}: predict then cuts
    tiles at the same size and resolution as training by default."""
    from oncotransfer.data.manifest import resolve_data_path
    path = ((meta.get("config") or {}).get("data") or {}).get("path")
    try:
        p = resolve_data_path(path)
    except Exception:  # data moved or never a slide set: fall back to the defaults
        return {}
    f = (p.parent if p.is_file() else p) / "tiling.json"
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, ValueError):
        return {}


def prefetch(batches: Iterator, depth: int = 3) -> Iterator:
    """Run ``batches`` in a reader thread, at most ``depth`` batches ahead (bounded memory)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def reader() -> None:
        try:
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


def score_slide(pred, path: Path, tile_size: int, mpp: float | None, magnification: float | None,
                mpp_source: float | None, min_tissue: float, batch_size: int = 16, depth: int = 3
                ) -> tuple[pd.DataFrame, np.ndarray, object, Image.Image]:
    """Tile probabilities of one slide: (rows slide,x,y,tissue,pred,prob_<class>, (N, C) probs, geometry,
    thumbnail). Tiles are read at ``tile_size`` and squash-resized to the model's size as in training."""
    from oncotransfer.data import slides as S
    from oncotransfer.data.images import resize_uint8
    slide = S.open_slide(path)
    try:
        geom = S.plan(slide, path, tile_size, mpp, magnification, mpp_source)
        thumb = S.thumbnail(slide)
        coords = S.tissue_tiles(geom, S.tissue_mask(thumb)[0], min_tissue)

        def batches():
            for part, arr in S.iter_tiles(slide, geom, coords, batch_size):
                t = torch.from_numpy(arr).permute(0, 3, 1, 2)
                if geom.tile != pred.size:  # the PNG tiles of training went through the same resize
                    t = torch.stack([resize_uint8(Image.fromarray(a), pred.size) for a in arr])
                yield part, pred.normalised(t)
        out = []
        for part, x in prefetch(batches(), depth):
            out.append(pred.probabilities(x, batch_size))
    finally:
        slide.close()
    probs = np.concatenate(out) if out else np.zeros((0, len(pred.classes)), np.float32)
    df = pd.DataFrame({"slide": geom.slide, "x": [c[0] for c in coords], "y": [c[1] for c in coords],
                       "tissue": [round(c[2], 4) for c in coords],
                       "pred": [pred.classes[k] for k in probs.argmax(1)] if len(probs) else []})
    for c, name in enumerate(pred.classes):
        df[f"prob_{name}"] = probs[:, c] if len(probs) else []
    return df, probs, geom, thumb


def predict_slides(run_dir: str | Path, sources: list[str], out: str | Path, aggregate_spec: str = "mean",
                   tile_size: int | None = None, mpp: float | None = None, magnification: float | None = None,
                   mpp_source: float | None = None, min_tissue: float | None = None, batch_size: int = 16,
                   log: Callable[[str], None] | None = None) -> tuple[pd.DataFrame, dict[str, str]]:
    """The ``predict --slide`` command. ``out``: one row per slide (slide, tiles, aggregate, pred,
    prob_<class>); beside it ``<out stem>_slides/<slide>_tiles.csv`` and ``<slide>_heatmap.png``. Tiling
    defaults come from the run's training tiles (tiling.json), else the model's input size at 0.5 µm/px.
    Batches of 16: ONNX Runtime's arena for a batch of 32 224-px images alone holds about 0.8 GB."""
    from oncotransfer.data.slides import SlideError, find_slides
    parse_aggregate(aggregate_spec)
    say = log or (lambda s: None)
    pred = onnx_predictor(run_dir, say)
    classes = pred.classes
    positive = ((pred.meta.get("config") or {}).get("evaluate") or {}).get("positive_classes")
    trained = training_tiling(pred.meta)
    if mpp is None and magnification is None:
        mpp, magnification = trained.get("mpp"), trained.get("magnification")
    tile_size = int(tile_size or trained.get("tile_size") or pred.size)
    min_tissue = float(trained.get("min_tissue", 0.5) if min_tissue is None else min_tissue)
    paths, errors = [], {}
    for s in sources:
        try:
            paths += find_slides(s)
        except DataError as e:
            errors[s] = str(e)
    out = Path(out)
    folder = out.parent / f"{out.stem}_slides"
    folder.mkdir(parents=True, exist_ok=True)
    from oncotransfer.evaluate.metrics import resolve_positive
    pos = resolve_positive(classes, positive)
    score_of = [classes.index(p) for p in pos] if pos else None
    rows = []
    for path in paths:
        try:
            df, probs, geom, thumb = score_slide(pred, path, tile_size, mpp, magnification, mpp_source,
                                                 min_tissue, batch_size)
        except (SlideError, OSError) as e:
            errors[str(path)] = str(e)
            continue
        df.to_csv(folder / f"{geom.slide}_tiles.csv", index=False)
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
        say(f"{path.name}: {len(probs)} tiles at {at} -> "
            f"{rows[-1]['pred']} ({describe_aggregate(aggregate_spec, classes, positive)})")
    summary = pd.DataFrame(rows, columns=["slide", "path", "tiles", "aggregate", "pred",
                                          *[f"prob_{c}" for c in classes]])
    out.parent.mkdir(parents=True, exist_ok=True)
    summary.to_csv(out, index=False)
    return summary, errors
