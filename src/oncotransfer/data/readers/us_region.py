"""The image region an ultrasound object declares (Sequence of Ultrasound Regions, PS3.3 C.8.5.5).

Scanners burn text into the frame around the image: patient banners, dates, depth scales, measurements,
annotation marks. A model learns whatever separates its classes, those marks included, so with
``data.us_region: auto`` a frame is cropped to its declared image region before anything else sees it.
"""
from __future__ import annotations

import numpy as np

__all__ = ["region_box", "crop_to_region", "burned_in"]

Box = tuple[int, int, int, int]
"""(x0, y0, x1, y1), inclusive pixel coordinates."""


def region_box(ds, rows: int | None = None, cols: int | None = None) -> Box | None:
    """The largest declared region by area, clamped to the frame; None when the object declares none usable.

    Coordinates are inclusive (RegionLocationMinX0..MaxX1). A corner one pixel past the frame is clamped
    (``OBXXXX1A.dcm``: MaxX1 = 800 in an 800-wide frame, an exclusive bound written as inclusive); a region
    reaching further is ignored, since its header then describes other pixels (pydicom's
    ``examples_ybr_color.dcm`` declares 84..595 x 31..414 on a 320 x 240 frame: the loop was downscaled after
    the region was written, and a clamped crop would cut the wrong part). Degenerate regions are ignored."""
    regions = ds.get("SequenceOfUltrasoundRegions") if hasattr(ds, "get") else None
    if not regions:
        return None
    rows = int(ds.get("Rows", 0) or 0) if rows is None else rows
    cols = int(ds.get("Columns", 0) or 0) if cols is None else cols
    best, best_area = None, 0
    for r in regions:
        try:
            x0, y0 = int(r.RegionLocationMinX0), int(r.RegionLocationMinY0)
            x1, y1 = int(r.RegionLocationMaxX1), int(r.RegionLocationMaxY1)
        except (AttributeError, TypeError, ValueError):  # a region without its corners says nothing usable
            continue
        if x1 > cols or y1 > rows:  # beyond the frame: the region is not about these pixels
            continue
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(cols - 1, x1), min(rows - 1, y1)
        area = (x1 - x0 + 1) * (y1 - y0 + 1)
        if x1 > x0 and y1 > y0 and area > best_area:
            best, best_area = (x0, y0, x1, y1), area
    return best


def crop_to_region(pixels: np.ndarray, ds) -> np.ndarray:
    """``pixels`` (H, W) or (H, W, C) cut to ``region_box``; unchanged when the object declares no region."""
    box = region_box(ds, pixels.shape[0], pixels.shape[1])
    if box is None:
        return pixels
    x0, y0, x1, y1 = box
    return pixels[y0:y1 + 1, x0:x1 + 1]


def burned_in(ds) -> bool:
    """The object says its pixels carry burned-in annotation (BurnedInAnnotation YES)."""
    return str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES"
