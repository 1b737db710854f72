"""Tissue masks on a slide's thumbnail, for brightfield (stained tissue on white glass) and fluorescence
(bright stained structures on a dark background) slides, and the rule that tells the two apart."""
from __future__ import annotations

import numpy as np
from PIL import Image

from oncotransfer.errors import ConfigError

TISSUE_MODES = ("auto", "brightfield", "fluorescence")
DARK_MEDIAN = 64
"""``auto``: a thumbnail whose median brightness (max over channels) is below this is fluorescence. Brightfield
light passes through glass (~200-250) and through tissue, which absorbs part of it: even a slide covered wall to
wall with dense H&E has a median well above 100 (the CMU H&E sample: 243; its darkest nuclei 1st percentile ~54).
Fluorescence emits from the stained structures only: the glass around and between them is near 0 (the DAPI
sample: median 13, 2 on glass). The median, not the border: tissue covers less than half of most slides, and a
brightfield scanner may fill an unscanned border with black, which the border test would call fluorescence."""
FLUO_FLOOR, FLUO_CEIL = 8, 12
"""Fluorescence threshold bounds (of 255) on the blurred intensity. Glass reads 2-4 with JPEG noise (the DAPI
sample's black corners), so 8 is clear of it. Loose tissue with scattered nuclei blurs to 10-20; Otsu (log
space) lands on ~20 there, splitting dense from loose tissue rather than tissue from glass, and left the loose
middle of the DAPI sample in patches (56% of its thumbnail; 70% at 12, the whole section without its corners)."""


def brightfield_mask(thumb: Image.Image) -> tuple[np.ndarray, float]:
    """(bool mask, threshold): Otsu on the blurred HSV saturation, which is near 0 on glass and high on
    stained tissue. The threshold is kept within 12-25 (of 255): glass stays below 12 even with JPEG noise,
    pale loose stroma is above 25, and an all-tissue (or all-glass) slide is not split in two by Otsu."""
    import cv2
    sat = cv2.medianBlur(cv2.cvtColor(np.asarray(thumb), cv2.COLOR_RGB2HSV)[..., 1], 5)
    # OpenCV's Otsu: the same threshold as skimage.filters.threshold_otsu on uint8, 5x faster.
    otsu = cv2.threshold(sat, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[0] if sat.min() != sat.max() else 0
    thr = float(np.clip(otsu, 12, 25))
    return sat > thr, thr


def fluorescence_mask(thumb: Image.Image) -> tuple[np.ndarray, float]:
    """(bool mask, threshold): the brightest channel (a DAPI slide is blue only), Gaussian-blurred over a few
    nuclei (0.5% of the thumbnail's side) so tissue with scattered nuclei is one region, then Otsu in log space
    (the signal spans decades above a near-0 background) kept within ``FLUO_FLOOR``-``FLUO_CEIL``."""
    import cv2
    bright = np.asarray(thumb).max(axis=2).astype(np.float32)
    sigma = max(2.0, max(bright.shape) / 200)
    blur = cv2.GaussianBlur(bright, (0, 0), sigma)
    log = np.clip(np.log1p(blur) * (255 / np.log(256)), 0, 255).astype(np.uint8)
    if log.min() == log.max():
        thr = float(FLUO_FLOOR)
    else:
        otsu = cv2.threshold(log, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[0]
        thr = float(np.clip(np.expm1(otsu * np.log(256) / 255), FLUO_FLOOR, FLUO_CEIL))
    return blur > thr, round(thr, 2)


def detect_mode(thumb: Image.Image) -> str:
    """``fluorescence`` when the thumbnail is mostly dark (see ``DARK_MEDIAN``), else ``brightfield``."""
    return "fluorescence" if float(np.median(np.asarray(thumb).max(axis=2))) < DARK_MEDIAN else "brightfield"


def tissue_mask(thumb: Image.Image, mode: str = "auto") -> tuple[np.ndarray, float, str]:
    """(bool mask, threshold, mode used) for ``mode`` auto | brightfield | fluorescence."""
    if mode not in TISSUE_MODES:
        raise ConfigError(f"--tissue {mode}: expected one of {' | '.join(TISSUE_MODES)}")
    used = detect_mode(thumb) if mode == "auto" else mode
    mask, thr = (fluorescence_mask if used == "fluorescence" else brightfield_mask)(thumb)
    return mask, thr, used
