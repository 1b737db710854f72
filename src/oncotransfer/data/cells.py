"""Cut fixed-size single-cell patches out of raw microscope fields.

Pipeline per field (greyscale float): contrast-normalise -> adaptive mean
threshold (OpenCV) -> opening / closing / hole filling -> drop objects below
``min_size`` (scikit-image) -> one bounding box per connected component ->
a ``patch_size`` square patch centred on each box, padded at image borders.

Layout in: ``RAW_DIR/<class>/<image>``; out: ``OUT_DIR/<class>/<stem>_cell<k>.png``
plus ``OUT_DIR/manifest.csv`` (``path,label,source,y0,x0,y1,x1``) and
``OUT_DIR/qc_montage.png``.
"""

from __future__ import annotations

import csv
import inspect
import math
from itertools import zip_longest
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage.morphology import remove_small_objects

from oncotransfer.data.readers import IMAGE_SUFFIXES, too_large_reason
from oncotransfer.errors import DataError
from oncotransfer.io import atomic_path, atomic_write_bytes, csv_cell, csv_value

Box = tuple[int, int, int, int]
POLARITIES = ("auto", "dark", "bright")
PAD_MODES = ("constant", "reflect", "edge")
MANIFEST_NAME = "manifest.csv"
MONTAGE_NAME = "qc_montage.png"
_TILE = 360  # montage tile side in pixels


@dataclass(frozen=True)
class CellParams:
    """Detection and patching settings.

    ``offset`` is in grey levels of the field after it is stretched to 0-255:
    a pixel is foreground when it exceeds its ``block_size`` local mean by more
    than ``offset`` (after inverting dark cells). ``polarity="auto"`` inverts
    the field when the intensity residual after removing a smooth background
    is negatively skewed, i.e. the rare, extreme pixels (the cells) are darker
    than the background. ``pad_mode="constant"`` (default) fills the part of a
    patch beyond the field with zeros: obviously "no data", and a cell cut by
    the border keeps its true, truncated shape. ``"reflect"`` continues the
    background texture but mirrors a cut cell into a fake symmetric twin,
    which a morphology classifier could learn; ``"edge"`` repeats the last row.
    ``max_cells_per_image`` keeps the largest cells of a crowded field.
    """

    block_size: int = 51
    offset: float = 10.0
    min_size: int = 150
    patch_size: int = 200
    polarity: Literal["auto", "dark", "bright"] = "auto"
    open_radius: int = 2
    close_radius: int = 3
    max_cells_per_image: int | None = None
    pad_mode: Literal["constant", "reflect", "edge"] = "constant"

    def __post_init__(self) -> None:
        def need_int(name: str, lo: int, note: str = "") -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise DataError(f"cell param {name}={v!r} is invalid: use an integer >= {lo}{note}")

        need_int("block_size", 3, " and odd (e.g. 51)")
        if self.block_size % 2 == 0:
            raise DataError(f"cell param block_size={self.block_size} is even: use an odd integer >= 3 (e.g. {self.block_size + 1})")
        off = self.offset
        if isinstance(off, bool) or not isinstance(off, (int, float, np.number)) or not 0 <= off < 255:
            raise DataError(f"cell param offset={off!r} is invalid: use a number of grey levels in [0, 255) (e.g. 10)")
        need_int("min_size", 1, " (pixels)")
        need_int("patch_size", 8, " (pixels, e.g. 200)")
        need_int("open_radius", 0)
        need_int("close_radius", 0)
        if self.max_cells_per_image is not None:
            need_int("max_cells_per_image", 1, " or None for no limit")
        if self.polarity not in POLARITIES:
            raise DataError(f"cell param polarity={self.polarity!r} is invalid: use one of {', '.join(POLARITIES)}")
        if self.pad_mode not in PAD_MODES:
            raise DataError(f"cell param pad_mode={self.pad_mode!r} is invalid: use one of {', '.join(PAD_MODES)}")


@dataclass
class CellExtractionResult:
    """What ``extract_cells`` wrote."""

    out_dir: Path
    manifest_path: Path
    montage_path: Path | None
    patch_size: int
    counts: dict[str, int]  # patches per class
    fields: dict[str, int]  # readable fields per class
    n_fields: int
    n_patches: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    empty_fields: list[str] = field(default_factory=list)  # fields with no cell found

    def summary(self) -> str:
        """Short human-readable report, one fact per line."""
        s = self.patch_size
        lines = [f"Extracted {self.n_patches} cell patches ({s}x{s}) from {self.n_fields} fields into {self.out_dir}"]
        lines += [f"  {c}: {self.counts.get(c, 0)} patches from {n} fields" for c, n in self.fields.items()]
        lines.append(f"Manifest: {self.manifest_path}")
        if self.montage_path is not None:
            lines.append(f"QC montage: {self.montage_path}")
        if self.empty_fields:
            eg = ", ".join(self.empty_fields[:3])
            lines.append(f"No cell found in {len(self.empty_fields)} field(s), e.g. {eg}: lower --offset or --min-size")
        if self.skipped:
            eg = "; ".join(f"{p} ({why})" for p, why in self.skipped[:3])
            lines.append(f"Skipped {len(self.skipped)} file(s): {eg}")
        return "\n".join(lines)


# ---------------------------------------------------------------- detection

def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _drop_small(mask: np.ndarray, min_size: int) -> np.ndarray:
    # scikit-image 0.26 renamed min_size (removes < n) to max_size (removes <= n).
    if "max_size" in inspect.signature(remove_small_objects).parameters:
        return remove_small_objects(mask, max_size=min_size - 1, connectivity=2)
    return remove_small_objects(mask, min_size=min_size, connectivity=2)


def _to_gray(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 3 and a.shape[2] in (3, 4):
        a = cv2.cvtColor(a[..., :3].astype(np.float32), cv2.COLOR_RGB2GRAY)
    if a.ndim != 2:
        raise DataError(f"expected a 2-D greyscale field (or HxWx3 RGB), got shape {a.shape}: pass one image plane")
    return np.nan_to_num(a.astype(np.float32))


def _is_bright(norm: np.ndarray, block_size: int) -> bool:
    # Cells are the rare, extreme pixels: after subtracting a smooth background
    # their side of the residual dominates the third moment.
    k = 2 * block_size + 1
    resid = norm - cv2.blur(norm, (k, k), borderType=cv2.BORDER_REFLECT)
    return float(np.mean(resid.astype(np.float64) ** 3)) >= 0.0


def _drop_nested(cells: list[tuple[int, Box]]) -> list[tuple[int, Box]]:
    # Large cells with an open rim leave bright interior fragments (nucleus,
    # granules) as separate objects; their box lies inside the cell's box.
    if len(cells) < 2:
        return cells
    area = np.array([a for a, _ in cells])
    b = np.array([box for _, box in cells])
    inside = ((b[None, :, 0] <= b[:, None, 0]) & (b[None, :, 1] <= b[:, None, 1])
              & (b[None, :, 2] >= b[:, None, 2]) & (b[None, :, 3] >= b[:, None, 3])
              & (area[None, :] > area[:, None]))  # inside[i, j]: i sits within bigger j
    return [c for c, nested in zip(cells, inside.any(axis=1)) if not nested]


def find_cells(gray: np.ndarray, params: CellParams) -> list[Box]:
    """Bounding boxes ``(y0, x0, y1, x1)`` (end-exclusive) of the cells in one field, sorted by (y0, x0)."""
    g = _to_gray(gray)
    # Stretch on a median-filtered copy so a single hot pixel cannot set the range.
    smooth = cv2.medianBlur(g, 3)
    lo, hi = float(smooth.min()), float(smooth.max())
    if hi - lo <= 1e-12:
        return []
    norm = np.clip((g - lo) / (hi - lo), 0.0, 1.0)
    bright = params.polarity == "bright" or (params.polarity == "auto" and _is_bright(norm, params.block_size))
    u8 = np.round(norm * 255).astype(np.uint8)
    if not bright:
        u8 = 255 - u8
    u8 = cv2.GaussianBlur(u8, (0, 0), 1.0)  # tame pixel noise before the local test
    mask = cv2.adaptiveThreshold(u8, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY,
                                 params.block_size, -float(params.offset))
    if params.open_radius:
        mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, _disk(params.open_radius))
    if params.close_radius:
        mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, _disk(params.close_radius))
    # Cells larger than the block only pass the local test at their rim: fill it in.
    fg = _drop_small(ndi.binary_fill_holes(mask > 0), params.min_size)
    n, _, stats, _ = cv2.connectedComponentsWithStats(fg.astype(np.uint8), connectivity=8)
    cells = [(int(st[cv2.CC_STAT_AREA]), (int(st[1]), int(st[0]), int(st[1] + st[3]), int(st[0] + st[2])))
             for st in stats[1:n]]
    cells = _drop_nested(cells)
    if params.max_cells_per_image is not None:
        cells = sorted(cells, key=lambda c: -c[0])[: params.max_cells_per_image]
    return sorted(box for _, box in cells)


def extract_patch(image: np.ndarray, box: Box, size: int = 200, pad_mode: str = "constant") -> np.ndarray:
    """A ``size`` x ``size`` patch centred on ``box``'s centre, padded where it leaves the image."""
    a = np.asarray(image)
    if pad_mode not in PAD_MODES:
        raise DataError(f"pad_mode={pad_mode!r} is invalid: use one of {', '.join(PAD_MODES)}")
    if size < 1:
        raise DataError(f"patch size={size} is invalid: use a positive integer (e.g. 200)")
    h, w = a.shape[:2]
    y0, x0, y1, x1 = (int(v) for v in box)
    if not (0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w):
        raise DataError(f"box {box} lies outside the {h}x{w} image: boxes are (y0, x0, y1, x1) inside it")
    top, left = (y0 + y1) // 2 - size // 2, (x0 + x1) // 2 - size // 2
    crop = a[max(top, 0):min(top + size, h), max(left, 0):min(left + size, w)]
    pads = [(max(-top, 0), max(top + size - h, 0)), (max(-left, 0), max(left + size - w, 0))]
    pads += [(0, 0)] * (a.ndim - 2)
    if not any(p for pair in pads for p in pair):
        return crop.copy()
    if pad_mode == "constant":
        return np.pad(crop, pads, mode="constant", constant_values=0)
    # np.pad reflects repeatedly when the pad is wider than the crop; a 1-px crop cannot reflect.
    mode = "edge" if pad_mode == "edge" or min(crop.shape[:2]) < 2 else "reflect"
    return np.pad(crop, pads, mode=mode)


# ---------------------------------------------------------------- file I/O

def _read_image(path: Path) -> np.ndarray | None:
    """RGB (HxWx3) or grey (HxW) array in the file's own dtype, or None when unreadable."""
    try:
        a = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_UNCHANGED)
    except (OSError, cv2.error):
        a = None
    bgr = a is not None
    if a is None:
        try:  # some TIFF flavours only Pillow decodes
            with Image.open(path) as im:
                a = np.asarray(im.convert("RGB") if im.mode in ("P", "CMYK", "YCbCr", "LAB", "HSV") else im)
        except Exception:  # Pillow raises many types for bad files; all mean "unreadable"
            return None
    if a.ndim == 3 and a.shape[2] in (1, 2):  # grey (+ alpha)
        a = a[..., 0]
    elif a.ndim == 3:  # colour (+ alpha); OpenCV decodes as BGR
        a = a[..., 2::-1] if bgr else a[..., :3]
    return np.ascontiguousarray(a) if a.ndim == 2 or (a.ndim == 3 and a.size) else None


def _to_uint8(a: np.ndarray) -> np.ndarray:
    # 8-bit stays as is; deeper data (often 12 bits in a 16-bit container) is stretched min-max.
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    f = np.nan_to_num(a.astype(np.float64))
    lo, hi = f.min(), f.max()
    return np.zeros(a.shape, np.uint8) if hi <= lo else np.round((f - lo) / (hi - lo) * 255).astype(np.uint8)


def _write_png(path: Path, rgb_or_gray: np.ndarray) -> None:
    a = rgb_or_gray if rgb_or_gray.ndim == 2 else cv2.cvtColor(rgb_or_gray, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", a)
    if not ok:
        raise DataError(f"could not encode {path.name} as PNG: check the image data")
    atomic_write_bytes(path, buf.tobytes())


def _qc_tile(img8: np.ndarray, boxes: list[Box], caption: str) -> np.ndarray:
    rgb = img8 if img8.ndim == 3 else cv2.cvtColor(img8, cv2.COLOR_GRAY2RGB)
    # Stretch for display only: masked or dim fields are otherwise near-black.
    rgb = cv2.normalize(rgb, None, 0, 255, cv2.NORM_MINMAX)
    scale = _TILE / max(rgb.shape[:2])
    small = cv2.resize(rgb, (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale))),
                       interpolation=cv2.INTER_AREA)
    for y0, x0, y1, x1 in boxes:
        cv2.rectangle(small, (int(x0 * scale), int(y0 * scale)), (int(x1 * scale), int(y1 * scale)), (0, 255, 0), 2)
    tile = np.full((_TILE + 20, _TILE, 3), 40, np.uint8)
    tile[: small.shape[0], : small.shape[1]] = small
    cv2.putText(tile, caption[:48], (4, _TILE + 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return tile


def _montage(tiles: list[np.ndarray]) -> np.ndarray:
    cols = min(3, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    th, tw = tiles[0].shape[:2]
    grid = np.zeros((rows * th, cols * tw, 3), np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, cols)
        grid[r * th:(r + 1) * th, c * tw:(c + 1) * tw] = t
    return grid


# ---------------------------------------------------------------- driver

def _collect(raw: Path) -> dict[str, list[Path]]:
    layout = f"expected {raw}/<class>/<image> with images in {', '.join(sorted(IMAGE_SUFFIXES))}"
    if not raw.is_dir():
        raise DataError(f"raw folder {raw} does not exist or is not a folder: {layout}")
    entries = [p for p in raw.iterdir() if not p.name.startswith(".")]
    classes = sorted(p for p in entries if p.is_dir())
    if not classes:
        loose = [p.name for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
        if loose:
            raise DataError(f"{len(loose)} image(s) sit directly in {raw} (e.g. {loose[0]}) with no class folder: "
                            f"{layout}, e.g. move them into {raw}/<class-name>/")
        raise DataError(f"no class folders in {raw}" + (" (it is empty)" if not entries else "") + f": {layout}")
    found = {c.name: sorted(p for p in c.iterdir() if p.is_file() and not p.name.startswith(".")) for c in classes}
    images = {c: [p for p in ps if p.suffix.lower() in IMAGE_SUFFIXES] for c, ps in found.items()}
    if not any(images.values()):
        others = [f"{c}/{p.name}" for c, ps in found.items() for p in ps][:3]
        what = f"only non-image files such as {', '.join(others)}" if others else "only empty class folders"
        raise DataError(f"no images in {raw}: found {what}; {layout}")
    return {c: ps for c, ps in images.items() if ps}


def _prepare_out(out: Path, raw: Path, overwrite: bool) -> None:
    ro, rr = out.resolve(), raw.resolve()
    if ro == rr or rr in ro.parents:
        raise DataError(f"output folder {out} is inside the raw folder {raw}: choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise DataError(f"output path {out} is a file: choose a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise DataError(f"output folder {out} is not empty: choose a new folder or pass overwrite=True (--overwrite)")
        # Remove only what a previous run listed, never unrelated files.
        old = out / MANIFEST_NAME
        if old.is_file():
            with old.open(newline="") as fh:
                for row in csv.DictReader(fh):
                    p = (out / csv_value(row.get("path") or "")).resolve()
                    if p.is_file() and ro in p.parents:
                        p.unlink()
            old.unlink()
        (out / MONTAGE_NAME).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def extract_cells(raw_dir: str | Path, out_dir: str | Path, params: CellParams = CellParams(),
                  montage_fields: int = 6, overwrite: bool = False) -> CellExtractionResult:
    """Detect cells in every ``RAW_DIR/<class>/<image>`` and write patches, manifest and QC montage."""
    raw, out = Path(raw_dir), Path(out_dir)
    if isinstance(montage_fields, bool) or not isinstance(montage_fields, int) or montage_fields < 0:
        raise DataError(f"montage_fields={montage_fields!r} is invalid: use an integer >= 0 (0 = no montage)")
    by_class = _collect(raw)
    _prepare_out(out, raw, overwrite)
    loose = sorted(p.name for p in raw.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    skipped = [(p, "not in a class folder") for p in loose]

    # Interleave classes so the montage shows every class, not just the first.
    order = [p for group in zip_longest(*by_class.values()) for p in group if p is not None]
    show = set(order[:montage_fields])
    tiles: dict[Path, np.ndarray] = {}
    rows: list[dict[str, object]] = []
    counts: dict[str, int] = {}
    fields: dict[str, int] = {}
    empty: list[str] = []
    for label, paths in by_class.items():
        (out / label).mkdir(exist_ok=True)
        used_stems: set[str] = set()
        for src in paths:
            rel_src = src.relative_to(raw).as_posix()
            too_large = too_large_reason(src)  # a 243 KB PNG may declare 16000 x 16000 px
            if too_large:
                skipped.append((rel_src, too_large))
                continue
            img = _read_image(src)
            if img is None:
                skipped.append((rel_src, "unreadable"))
                continue
            fields[label] = fields.get(label, 0) + 1
            boxes = find_cells(_to_gray(img), params)
            img8 = _to_uint8(img)
            stem = src.stem if src.stem not in used_stems else f"{src.stem}_{src.suffix.lstrip('.').lower()}"
            used_stems.add(stem)
            if not boxes:
                empty.append(rel_src)
            for k, box in enumerate(boxes, start=1):
                name = f"{label}/{stem}_cell{k}.png"
                _write_png(out / name, extract_patch(img8, box, params.patch_size, params.pad_mode))
                rows.append({"path": name, "label": label, "source": rel_src,
                             "y0": box[0], "x0": box[1], "y1": box[2], "x1": box[3]})
            counts[label] = counts.get(label, 0) + len(boxes)
            if src in show:
                tiles[src] = _qc_tile(img8, boxes, f"{rel_src} ({len(boxes)} cells)")

    n_fields = sum(fields.values())
    if n_fields == 0:
        p, why = skipped[0]
        raise DataError(f"none of the {len(skipped)} image file(s) in {raw} could be read (e.g. {p}: {why}): check "
                        "they are valid images")
    manifest = out / MANIFEST_NAME
    with atomic_path(manifest) as tmp, tmp.open("w", newline="") as fh:  # written last, whole or not at all
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "source", "y0", "x0", "y1", "x1"])
        writer.writeheader()
        writer.writerows({k: csv_cell(v) for k, v in row.items()} for row in rows)
    montage_path = None
    if tiles:
        montage_path = out / MONTAGE_NAME
        _write_png(montage_path, _montage([tiles[p] for p in order if p in tiles]))
    return CellExtractionResult(out_dir=out, manifest_path=manifest, montage_path=montage_path,
                                patch_size=params.patch_size, counts=counts, fields=fields, n_fields=n_fields,
                                n_patches=len(rows), skipped=skipped, empty_fields=empty)
