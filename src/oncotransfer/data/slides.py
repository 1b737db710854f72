"""Whole-slide images: open (OpenSlide, tiffslide fallback), find tissue, cut tiles at a physical resolution.

``slides tile`` writes tiles + manifest.csv (path,label,slide,patient,x,y,tissue) that ``train`` reads as
any manifest: the patient column is the slide's patient when the labels CSV gives one, else the slide name,
so splits never put tiles of one slide (or patient) on both sides.
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from oncotransfer.data.manifest import read_table
from oncotransfer.data.readers.slide import SLIDE_SUFFIXES, SlideError, open_slide, slide_property
from oncotransfer.errors import ConfigError, DataError

__all__ = ["SLIDE_SUFFIXES", "SlideError", "open_slide", "plan", "thumbnail", "tissue_mask", "tile_slides"]

THUMB_SIDE = 2048
"""Longest side of the low-resolution image used for tissue detection, thumbnails and heatmaps."""


@dataclass
class Geometry:
    """How one slide is cut: tiles of ``tile`` px at ``mpp`` µm/px, i.e. ``size0`` level-0 px, read at
    ``level`` as ``read`` px squares then resized to ``tile``."""
    slide: str
    path: str
    width: int
    height: int
    mpp0: float | None
    mpp0_source: str
    mpp: float | None
    downsample: float
    tile: int
    size0: float
    level: int
    read: int

    def grid(self) -> tuple[int, int]:
        return int(self.width // self.size0), int(self.height // self.size0)

    def origin(self, i: int, j: int) -> tuple[int, int]:
        return int(round(i * self.size0)), int(round(j * self.size0))


def plan(slide, path: str | Path, tile_size: int = 224, mpp: float | None = None,
         magnification: float | None = None, mpp_source: float | None = None) -> Geometry:
    """Tile geometry from the slide's resolution metadata (``mpp_source``: level-0 µm/px for slides that have
    none). ``magnification`` uses the slide's objective power when recorded, else 10 / magnification µm/px."""
    path = Path(path)
    if mpp is not None and magnification is not None:
        raise ConfigError("give --mpp or --magnification, not both")
    if tile_size < 16:
        raise ConfigError(f"--tile-size {tile_size}: expected at least 16 px")
    for name, v in (("--mpp", mpp), ("--magnification", magnification), ("--mpp-source", mpp_source)):
        if v is not None and not v > 0:
            raise ConfigError(f"{name} {v}: expected a positive number")
    mpp0, source = slide_property(slide, "mpp-x"), "metadata"
    if mpp0 is None and mpp_source is not None:
        mpp0, source = float(mpp_source), "--mpp-source"
    objective = slide_property(slide, "objective-power")
    if magnification is not None and objective is not None:
        downsample = objective / magnification
        target = None if mpp0 is None else mpp0 * downsample
    else:
        target = 10.0 / magnification if magnification is not None else (0.5 if mpp is None else float(mpp))
        if mpp0 is None:
            raise SlideError(f"{path}: the slide records no resolution (microns per pixel); give "
                             "--mpp-source MPP (the scanner's level-0 µm/px, e.g. 0.25 for 40x)")
        downsample = target / mpp0
    if downsample < 0.95:
        raise SlideError(f"{path}: scanned at {mpp0} µm/px, coarser than the {target} µm/px asked for; "
                         "tiles would be upsampled: ask for a coarser --mpp or lower --magnification")
    coarsest = max(slide.level_dimensions[-1])
    if coarsest > 4 * THUMB_SIDE:  # a flat (single-level) image: the thumbnail would decode it whole
        raise SlideError(f"{path}: no pyramid (its coarsest level is {coarsest} px wide); write one, e.g. "
                         "`vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg`")
    size0 = tile_size * downsample
    level = int(slide.get_best_level_for_downsample(downsample))
    read = max(1, int(round(size0 / float(slide.level_downsamples[level]))))
    w, h = (int(v) for v in slide.dimensions)
    return Geometry(path.stem, str(path), w, h, mpp0, source, target, downsample, tile_size, size0, level, read)


def thumbnail(slide, side: int = THUMB_SIDE) -> Image.Image:
    """RGB image of the whole slide, longest side at most ``side`` (read from a low-resolution level)."""
    return slide.get_thumbnail((side, side)).convert("RGB")


def tissue_mask(thumb: Image.Image) -> tuple[np.ndarray, float]:
    """(bool mask, threshold): Otsu on the blurred HSV saturation, which is near 0 on glass and high on
    stained tissue. The threshold is kept within 12-25 (of 255): glass stays below 12 even with JPEG noise,
    pale loose stroma is above 25, and an all-tissue (or all-glass) slide is not split in two by Otsu."""
    import cv2
    sat = cv2.medianBlur(cv2.cvtColor(np.asarray(thumb), cv2.COLOR_RGB2HSV)[..., 1], 5)
    # OpenCV's Otsu: the same threshold as skimage.filters.threshold_otsu on uint8, 5x faster.
    otsu = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[0] if sat.min() != sat.max() else 0
    thr = float(np.clip(otsu, 12, 25))
    return sat > thr, thr


def tissue_fractions(geom: Geometry, mask: np.ndarray) -> np.ndarray:
    """(ny, nx) fraction of tissue under each grid tile, from the mask's summed-area table."""
    nx, ny = geom.grid()
    mh, mw = mask.shape
    sx, sy = mw / geom.width, mh / geom.height
    import cv2
    integral = cv2.integral(mask.astype(np.uint8)).astype(np.float64)  # (mh + 1, mw + 1) summed-area table
    x = np.arange(nx + 1) * geom.size0
    y = np.arange(ny + 1) * geom.size0
    xi = np.clip(np.round(x * sx).astype(int), 0, mw)
    yi = np.clip(np.round(y * sy).astype(int), 0, mh)
    # A tile smaller than one mask pixel still looks at that pixel.
    x1 = np.maximum(xi[1:], np.minimum(xi[:-1] + 1, mw))
    y1 = np.maximum(yi[1:], np.minimum(yi[:-1] + 1, mh))
    x0, y0 = np.minimum(xi[:-1], x1 - 1), np.minimum(yi[:-1], y1 - 1)
    area = np.outer(y1 - y0, x1 - x0).astype(np.float64)
    s = (integral[np.ix_(y1, x1)] - integral[np.ix_(y0, x1)] - integral[np.ix_(y1, x0)] + integral[np.ix_(y0, x0)])
    return s / np.maximum(area, 1)


def tissue_tiles(geom: Geometry, mask: np.ndarray, min_tissue: float) -> list[tuple[int, int, float]]:
    """(x, y, tissue fraction) in level-0 px of every grid tile with at least ``min_tissue`` tissue."""
    if not 0 <= min_tissue <= 1:
        raise ConfigError(f"--min-tissue {min_tissue}: expected a fraction in 0..1")
    frac = tissue_fractions(geom, mask)
    keep = np.argwhere(frac >= min_tissue) if min_tissue > 0 else np.argwhere(np.ones_like(frac, bool))
    return [(*geom.origin(int(i), int(j)), float(frac[j, i])) for j, i in keep]


def read_tile(slide, geom: Geometry, x: int, y: int) -> Image.Image:
    """The ``tile`` px RGB tile whose level-0 top-left corner is (x, y); transparent areas become white."""
    try:
        region = slide.read_region((x, y), geom.level, (geom.read, geom.read))
    except Exception as e:  # OpenSlideError, tifffile or codec errors on a damaged tile: one line
        raise SlideError(f"{geom.path}: cannot read the tile at ({x}, {y}): {str(e)[:100] or type(e).__name__}"
                         ) from None
    if region.mode == "RGBA":
        a = np.asarray(region)
        if a[..., 3].min() == 255:  # opaque, as nearly always: compositing over white would change nothing
            region = Image.fromarray(np.ascontiguousarray(a[..., :3]))
        else:
            region = Image.alpha_composite(Image.new("RGBA", region.size, (255, 255, 255, 255)), region)
    region = region.convert("RGB")
    if geom.read != geom.tile:
        region = region.resize((geom.tile, geom.tile), Image.BILINEAR)
    return region


def iter_tiles(slide, geom: Geometry, coords: list[tuple[int, int, float]], batch_size: int = 32
               ) -> Iterator[tuple[list[tuple[int, int, float]], np.ndarray]]:
    """Batches of (coordinates, uint8 (B, tile, tile, 3)) read on demand: memory is one batch, never the slide."""
    for s in range(0, len(coords), batch_size):
        part = coords[s:s + batch_size]
        yield part, np.stack([np.asarray(read_tile(slide, geom, x, y)) for x, y, _ in part])


def draw_tiles(thumb: Image.Image, geom: Geometry, coords: list[tuple[int, int, float]]) -> Image.Image:
    """The thumbnail with each kept tile outlined."""
    out = thumb.copy()
    draw = ImageDraw.Draw(out)
    sx, sy = out.width / geom.width, out.height / geom.height
    for x, y, _ in coords:
        draw.rectangle([x * sx, y * sy, (x + geom.size0) * sx - 1, (y + geom.size0) * sy - 1], outline=(0, 160, 0))
    return out


def find_slides(source: str | Path) -> list[Path]:
    """One slide file, or every slide file under a folder (recursively)."""
    p = Path(source).expanduser()
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise DataError(f"{p}: no such slide or folder")
    found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SLIDE_SUFFIXES)
    if not found:
        raise DataError(f"{p}: no slides found ({', '.join(sorted(SLIDE_SUFFIXES))})")
    names = [f.stem for f in found]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"{p}: slide name(s) {dup[:3]} occur twice; slide names (file stems) must be unique")
    return found


def read_labels(csv: str | Path) -> dict[str, tuple[str, str | None]]:
    """slide (file stem or file name) -> (label, patient or None) from a CSV with columns slide,label[,patient]."""
    csv = Path(csv)
    df = read_table(csv, {"slide", "label"}, "slide,label[,patient]", "labels CSV")
    out = {}
    for r in df.itertuples(index=False):
        patient = getattr(r, "patient", "") or None
        out[Path(r.slide).stem if Path(r.slide).suffix.lower() in SLIDE_SUFFIXES else r.slide] = (r.label, patient)
    return out


@dataclass
class TileResult:
    out_dir: Path
    manifest: Path
    slides: list[dict]
    failed: dict[str, str]

    def summary(self) -> str:
        n = sum(s["tiles"] for s in self.slides)
        return (f"{n} tiles from {len(self.slides)} slide(s) -> {self.manifest}"
                + (f"; {len(self.failed)} slide(s) failed" if self.failed else ""))


def tile_slide(path: Path, out_dir: Path, tile_size: int, mpp: float | None, magnification: float | None,
               mpp_source: float | None, min_tissue: float, workers: int = 2) -> tuple[list[dict], dict]:
    """Tile one slide into ``out_dir/tiles/<slide>/``; returns (manifest rows, slide summary)."""
    slide = open_slide(path)
    try:
        geom = plan(slide, path, tile_size, mpp, magnification, mpp_source)
        thumb = thumbnail(slide)
        mask, thr = tissue_mask(thumb)
        coords = tissue_tiles(geom, mask, min_tissue)
        folder = out_dir / "tiles" / geom.slide
        folder.mkdir(parents=True, exist_ok=True)

        def write(c: tuple[int, int, float]) -> dict:
            x, y, frac = c
            name = folder / f"{geom.slide}_x{x}_y{y}.png"
            read_tile(slide, geom, x, y).save(name, compress_level=1)  # lossless; level 1 is 5x faster than 6
            return {"path": name.relative_to(out_dir).as_posix(), "slide": geom.slide, "x": x, "y": y,
                    "tissue": round(frac, 4)}
        with ThreadPoolExecutor(max(1, workers)) as pool:  # OpenSlide, zlib and resizing release the GIL
            rows = list(pool.map(write, coords))
        thumbs = out_dir / "thumbnails"
        thumbs.mkdir(parents=True, exist_ok=True)
        draw_tiles(thumb, geom, coords).save(thumbs / f"{geom.slide}.png")
        nx, ny = geom.grid()
        info = {**asdict(geom), "tiles": len(rows), "grid_tiles": nx * ny, "tissue_threshold": thr,
                "min_tissue": min_tissue}
        return rows, info
    finally:
        slide.close()


def tile_slides(source: str | Path, out_dir: str | Path, tile_size: int = 224, mpp: float | None = None,
                magnification: float | None = None, mpp_source: float | None = None,
                labels: str | Path | None = None, min_tissue: float = 0.5, overwrite: bool = False,
                log: Callable[[str], None] | None = None) -> TileResult:
    """``slides tile``: tiles, OUT/manifest.csv, OUT/thumbnails/<slide>.png and OUT/tiling.json. A slide that
    cannot be read is named with its reason in ``failed`` and the others are still tiled."""
    say = log or (lambda s: None)
    out = Path(out_dir)
    if (out / "manifest.csv").exists() and not overwrite:
        raise DataError(f"{out}/manifest.csv exists; choose another OUT or pass --overwrite")
    slides = find_slides(source)
    table = read_labels(labels) if labels else None
    if table is not None:
        unlabelled = [p.name for p in slides if p.stem not in table]
        if unlabelled:
            raise DataError(f"{labels}: no label for slide(s) {unlabelled[:3]}"
                            f"{' and more' if len(unlabelled) > 3 else ''}; add a row slide,label per slide")
    out.mkdir(parents=True, exist_ok=True)
    rows, infos, failed = [], [], {}
    single = Path(source).is_file()
    for path in slides:
        try:
            got, info = tile_slide(path, out, tile_size, mpp, magnification, mpp_source, min_tissue)
        except (SlideError, OSError) as e:
            if single:
                raise e if isinstance(e, SlideError) else SlideError(f"{path}: {e}") from None
            failed[str(path)] = str(e)
            say(f"skipped: {e}")
            continue
        label, patient = table[path.stem] if table is not None else ("", None)
        for r in got:
            r.update(label=label, patient=patient or path.stem)
        rows += got
        infos.append(info)
        say(f"{path.name}: {info['tiles']} of {info['grid_tiles']} tiles kept at "
            f"{'%.3g µm/px' % info['mpp'] if info['mpp'] else 'downsample %.3g' % info['downsample']}")
    if not infos:
        raise DataError(f"{source}: no slide could be tiled, e.g. {next(iter(failed.values()))}")
    cols = ["path", "label", "slide", "patient", "x", "y", "tissue"]
    pd.DataFrame(rows, columns=cols).to_csv(out / "manifest.csv", index=False)
    (out / "tiling.json").write_text(json.dumps({
        "tile_size": tile_size, "mpp": mpp, "magnification": magnification, "mpp_source": mpp_source,
        "min_tissue": min_tissue, "labels": str(labels) if labels else None, "slides": infos,
        "failed": failed}, indent=2))
    return TileResult(out, out / "manifest.csv", infos, failed)
