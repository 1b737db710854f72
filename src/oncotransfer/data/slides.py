"""Whole-slide images: open (OpenSlide, tiffslide fallback), find tissue, cut tiles at a physical resolution.

``slides tile`` writes tiles + manifest.csv (path,label,slide,patient,x,y,tissue) that ``train`` reads as
any manifest: the patient column is the slide's patient when the labels CSV gives one, else the slide name,
so splits never put tiles of one slide (or patient) on both sides.
"""
from __future__ import annotations

import json
import math
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from oncotransfer.data.readers.base import one_line, read_head
from oncotransfer.data.slide_tables import check_labels, read_labels, read_tiling
from oncotransfer.data.readers.tiffcheck import TiffStructureError, check_tiff
from oncotransfer.data.readers.slide import (SLIDE_SUFFIXES, SlideError, SlideReader, dicom_series_uid, is_dicom_wsi,
                                             open_slide, slide_mpp, slide_property)
from oncotransfer.data.tissue import TISSUE_MODES, tissue_mask
from oncotransfer.errors import ConfigError, DataError, OncoError
from oncotransfer.io import atomic_to_csv
from oncotransfer.limits import MAX_PIXELS, MAX_TILE_SIDE, TILE_BATCH_BYTES

__all__ = ["SLIDE_SUFFIXES", "TISSUE_MODES", "SlideError", "open_slide", "plan", "thumbnail", "tissue_mask",
           "tile_slides", "find_slides"]

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
    mpp0_ignored: str | None = None
    """Why the file's own resolution was not used (implausible, or overridden by --mpp-source)."""

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
    if not 16 <= tile_size <= MAX_TILE_SIDE:
        raise ConfigError(f"--tile-size {tile_size}: expected 16 to {MAX_TILE_SIDE} px (a tile is one image the "
                          "model scores; oncotransfer.limits.MAX_TILE_SIDE)")
    for name, v in (("--mpp", mpp), ("--magnification", magnification), ("--mpp-source", mpp_source)):
        if v is not None and not (v > 0 and math.isfinite(v)):
            raise ConfigError(f"{name} {v}: expected a positive finite number")
    meta, ignored = slide_mpp(slide)
    if mpp_source is not None:  # the user's word wins: files carry wrong resolutions (see readers.slide_mpp)
        mpp0, source = float(mpp_source), "--mpp-source"
        if meta is not None and abs(meta - mpp0) > 0.01 * meta:
            ignored = f"the file says {meta:.4g} µm/px; --mpp-source {mpp0:g} used instead"
    else:
        mpp0, source = meta, "metadata" if meta is not None else "none"
    objective = slide_property(slide, "objective-power")
    if magnification is not None and objective is not None:
        downsample = objective / magnification
        target = None if mpp0 is None else mpp0 * downsample
    else:
        target = 10.0 / magnification if magnification is not None else (0.5 if mpp is None else float(mpp))
        if mpp0 is None:
            raise SlideError(f"{path}: {ignored or 'the slide records no resolution (microns per pixel)'}; give "
                             "--mpp-source MPP (the scanner's level-0 µm/px, e.g. 0.25 for 40x)")
        downsample = target / mpp0
    if downsample < 0.95:
        fix = ("give the right --mpp-source" if source == "--mpp-source" else
               "ask for a coarser --mpp or lower --magnification, or, if the file's resolution is wrong, give "
               "--mpp-source (the scanner's level-0 µm/px)")
        raise SlideError(f"{path}: scanned at {mpp0:g} µm/px ({source}), coarser than the {target:g} µm/px asked "
                         f"for; tiles would be upsampled: {fix}")
    coarsest = max(slide.level_dimensions[-1])
    if coarsest > 4 * THUMB_SIDE:  # a flat (single-level) image: the thumbnail would decode it whole
        raise SlideError(f"{path}: no pyramid (its coarsest level is {coarsest} px wide); write one, e.g. "
                         "`vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg`")
    size0 = tile_size * downsample
    level = int(slide.get_best_level_for_downsample(downsample))
    read = max(1, int(round(size0 / float(slide.level_downsamples[level]))))
    if read * read > MAX_PIXELS:  # no level near the asked resolution: each tile would be cut from a huge region
        raise SlideError(f"{path}: each {tile_size} px tile would be read as a {read} x {read} px region of level "
                         f"{level}, above the limit of {MAX_PIXELS:,} pixels; ask for a finer --mpp or write a "
                         "pyramid with more levels")
    w, h = (int(v) for v in slide.dimensions)
    geom = Geometry(path.stem, str(path), w, h, mpp0, source, target, downsample, tile_size, size0, level, read,
                    ignored)
    if 0 in geom.grid():  # "0 of 0 tiles" and exit 0 would read as a slide without tissue
        at = f"{target:g} µm/px" if target else f"downsample {downsample:g}"
        raise SlideError(f"{path}: {w} x {h} px is smaller than one {tile_size} px tile at {at} ({size0:.0f} px of "
                         "the slide); give a smaller --tile-size or a finer --mpp")
    return geom


@contextmanager
def reading(path: str | Path, what: str = "read the slide") -> Iterator[None]:
    """Any failure of the slide's libraries (OpenSlide, tifffile, codecs, OpenCV) as one ``SlideError`` line
    naming the file: a corrupt tile in one slide must not end a folder's run with a traceback."""
    try:
        yield
    except OncoError:
        raise
    except Exception as e:  # noqa: BLE001 - OpenSlideError, ValueError, struct.error, cv2.error...
        raise SlideError(f"{path}: cannot {what} ({type(e).__name__}: {one_line(e, 120)})") from None


def thumbnail(slide, side: int = THUMB_SIDE, path: str | Path = "slide") -> Image.Image:
    """RGB image of the whole slide, longest side at most ``side`` (read from a low-resolution level)."""
    with reading(path, "read its thumbnail"):
        return slide.get_thumbnail((side, side)).convert("RGB")


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
    """Batches of (coordinates, uint8 (B, tile, tile, 3)) read on demand: memory is one batch, never the slide,
    and a batch holds at most ``TILE_BATCH_BYTES`` (large tiles come fewer at a time)."""
    batch_size = max(1, min(batch_size, TILE_BATCH_BYTES // (3 * geom.tile * geom.tile)))
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


def find_slides(source: str | Path, skipped: dict[str, str] | None = None) -> list[Path]:
    """One slide file, or every slide under a folder (recursively): what ``readers.SlideReader`` claims (vendor
    suffixes, pyramidal TIFFs, DICOM whole-slide files), one file per DICOM series (OpenSlide opens the whole
    pyramid from any file of it). ``skipped`` receives the slide-like files left out and why."""
    p = Path(source).expanduser()
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise DataError(f"{p}: no such slide or folder")
    skipped = {} if skipped is None else skipped
    reader, found, series = SlideReader(), [], {}
    for f in sorted(f for f in p.rglob("*") if f.is_file()):
        head = read_head(f, 1024)
        if not reader.claims(f, head):
            if f.suffix.lower() in SLIDE_SUFFIXES:
                skipped[str(f)] = ("a DICOM file but not a whole-slide image" if f.suffix.lower() == ".dcm"
                                   else _not_pyramidal(f))
            continue
        uid = dicom_series_uid(f) if is_dicom_wsi(f, head) else None
        if uid is not None and uid in series:
            skipped[str(f)] = f"another file of the DICOM whole-slide series of {series[uid].name}"
            continue
        if uid is not None:
            series[uid] = f
        found.append(f)
    if not found:
        raise DataError(f"{p}: no slides found (vendor files {', '.join(sorted(SLIDE_SUFFIXES - {'.dcm'}))}, "
                        f"pyramidal TIFF or DICOM whole-slide){f'; {len(skipped)} file(s) skipped' if skipped else ''}")
    names = [f.stem for f in found]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DataError(f"{p}: slide name(s) {dup[:3]} occur twice; slide names (file stems) must be unique")
    return found


def _not_pyramidal(f: Path) -> str:
    """Why a .tif is not a slide: its damage when its structure is broken (a looping IFD chain reads as one
    level), else that it is flat or unparseable."""
    try:
        check_tiff(f)
    except (TiffStructureError, OSError) as e:
        return str(e).removeprefix(f"{f}: ")
    return "not a pyramidal TIFF (a flat image, or one its reader cannot parse)"


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


def slide_tiles(slide, path: Path, tile_size: int, mpp: float | None, magnification: float | None,
                mpp_source: float | None, min_tissue: float, tissue: str = "auto"
                ) -> tuple[Geometry, Image.Image, list[tuple[int, int, float]], dict]:
    """Geometry, thumbnail, kept tiles and the tissue facts (mode, threshold, fraction of the thumbnail) of one
    open slide: what ``slides tile`` and ``predict --slide`` share. Library failures are one ``SlideError``."""
    geom = plan(slide, path, tile_size, mpp, magnification, mpp_source)
    thumb = thumbnail(slide, path=path)
    with reading(path, "find its tissue"):
        mask, thr, mode = tissue_mask(thumb, tissue)
        coords = tissue_tiles(geom, mask, min_tissue)
    return geom, thumb, coords, {"tissue": mode, "tissue_threshold": thr,
                                 "tissue_fraction": round(float(mask.mean()), 4)}


def tile_slide(path: Path, out_dir: Path, tile_size: int, mpp: float | None, magnification: float | None,
               mpp_source: float | None, min_tissue: float, workers: int = 2, tissue: str = "auto"
               ) -> tuple[list[dict], dict]:
    """Tile one slide into ``out_dir/tiles/<slide>/``; returns (manifest rows, slide summary)."""
    slide = open_slide(path)
    folder = None
    try:
        geom, thumb, coords, found = slide_tiles(slide, path, tile_size, mpp, magnification, mpp_source,
                                                 min_tissue, tissue)
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
        info = {**asdict(geom), "tiles": len(rows), "grid_tiles": nx * ny, **found, "min_tissue": min_tissue}
        return rows, info
    except BaseException:  # a tile failed mid-way: its slide's tiles written so far would be orphans
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    finally:
        slide.close()


def tile_slides(source: str | Path, out_dir: str | Path, tile_size: int = 224, mpp: float | None = None,
                magnification: float | None = None, mpp_source: float | None = None,
                labels: str | Path | None = None, min_tissue: float = 0.5, overwrite: bool = False,
                log: Callable[[str], None] | None = None, tissue: str = "auto") -> TileResult:
    """``slides tile``: tiles, OUT/manifest.csv, OUT/thumbnails/<slide>.png and OUT/tiling.json. A slide that
    cannot be read is named with its reason in ``failed`` (and tiling.json) and the others are still tiled."""
    say = log or (lambda s: None)
    if tissue not in TISSUE_MODES:
        raise ConfigError(f"--tissue {tissue}: expected one of {' | '.join(TISSUE_MODES)}")
    out = Path(out_dir)
    if (out / "manifest.csv").exists() and not overwrite:
        raise DataError(f"{out}/manifest.csv exists; choose another OUT or pass --overwrite")
    skipped: dict[str, str] = {}
    slides = find_slides(source, skipped)
    for f, why in skipped.items():
        say(f"skipped {f}: {why}")
    table = read_labels(labels) if labels else None
    if table is not None:
        check_labels(table, slides, skipped, labels, source)
    out.mkdir(parents=True, exist_ok=True)
    rows, infos, failed = [], [], {}
    single = Path(source).is_file()
    for path in slides:
        try:
            with reading(path):
                got, info = tile_slide(path, out, tile_size, mpp, magnification, mpp_source, min_tissue,
                                       tissue=tissue)
        except SlideError as e:
            if single:
                raise
            failed[str(path)] = str(e)
            say(f"failed: {e}")
            continue
        label, patient = table[path.stem] if table is not None else ("", None)
        for r in got:
            r.update(label=label, patient=patient or path.stem)
        rows += got
        infos.append(info)
        at = "%.3g µm/px" % info["mpp"] if info["mpp"] else "downsample %.3g" % info["downsample"]
        say(f"{path.name}: {info['tiles']} of {info['grid_tiles']} tiles kept at {at} ({info['tissue']} tissue "
            f"mask, {info['tissue_fraction']:.0%} of the slide)"
            + (f"; {info['mpp0_ignored']}" if info.get("mpp0_ignored") else ""))
    if not infos:
        raise DataError(f"{source}: no slide could be tiled, e.g. {next(iter(failed.values()))}")
    if not rows:
        raise DataError(f"{source}: no tile has at least {min_tissue:g} tissue; lower --min-tissue or choose "
                        f"--tissue brightfield or fluorescence; thumbnails in {out / 'thumbnails'}")
    cols = ["path", "label", "slide", "patient", "x", "y", "tissue"]
    atomic_to_csv(pd.DataFrame(rows, columns=cols), out / "manifest.csv", index=False)
    (out / "tiling.json").write_text(json.dumps({
        "tile_size": tile_size, "mpp": mpp, "magnification": magnification, "mpp_source": mpp_source,
        "min_tissue": min_tissue, "tissue": tissue, "labels": str(labels) if labels else None, "slides": infos,
        "failed": failed, "skipped": skipped}, indent=2))
    return TileResult(out, out / "manifest.csv", infos, failed)
