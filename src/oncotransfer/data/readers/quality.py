"""Images that decode but show nothing: constant or near-blank frames.

A decode that silently goes wrong often looks like this (a big-endian palette read little-endian came out
all black), and so do empty frames a scanner saved. They are named, never dropped: a user decides.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["BLANK_STD", "blank_reason"]

BLANK_STD = 2.0
"""Largest pixel standard deviation (0..255 scale, all channels) of a near-blank image, measured: the busi-dev
ultrasound images have 29.6 at the lowest (median 52); among pydicom's test images the lowest that shows content is a
low-contrast 16 x 16 MR patch at 3.8, while its scanned white page with a few specks (SC_rgb_jpeg.dcm) has 0.9
and 1.5 in a second encoding, and an almost-white 16 x 16 frame 0.4 (``benchmarks/dicom_decode.py``)"""


def blank_reason(img: Image.Image | np.ndarray) -> str | None:
    """Why an 8-bit image (PIL, or a uint8 array (H, W), (H, W, C) or (C, H, W)) is blank, or None.

    ``constant image (every pixel = 0)`` when all samples are equal; ``near-blank image (pixel std 0.3 of
    255)`` when their standard deviation is below ``BLANK_STD``."""
    a = np.asarray(img)
    if a.size == 0:
        return "empty image (no pixels)"
    lo, hi = int(a.min()), int(a.max())
    if lo == hi:
        return f"constant image (every pixel = {lo})"
    std = float(a.std(dtype=np.float64))
    return f"near-blank image (pixel std {std:.1f} of 255)" if std < BLANK_STD else None
