"""Pyramidal tiled TIFF slides for tests and benchmarks, written tile by tile with tifffile (never whole in memory).

Levels are successive full-resolution IFDs (what OpenSlide's "generic tiled TIFF" and tiffslide both read;
OpenSlide ignores SubIFD pyramids), with resolution tags so the slide's µm/px is known.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

Region = Callable[[int, int, int, int, int], np.ndarray]
"""(downsample, y0, x0, h, w) -> uint8 (h, w, 3): the slide's content at that level."""


def write_slide(path: Path, region: Region, width: int, height: int, mpp: float | None = 0.25, levels: int = 4,
                tile: int = 256, compression: str | None = "jpeg") -> Path:
    import tifffile
    path = Path(path)
    with tifffile.TiffWriter(path, bigtiff=width * height * 3 > 3_000_000_000) as tif:
        for k in range(levels):
            d = 2 ** k
            w, h = -(-width // d), -(-height // d)

            def tiles(w=w, h=h, d=d):
                for y0 in range(0, h, tile):
                    for x0 in range(0, w, tile):
                        t = np.full((tile, tile, 3), 255, np.uint8)
                        hh, ww = min(tile, h - y0), min(tile, w - x0)
                        t[:hh, :ww] = region(d, y0, x0, hh, ww)
                        yield t
            kw = {}
            if mpp:
                kw = {"resolution": (1e4 / (mpp * d), 1e4 / (mpp * d)), "resolutionunit": "CENTIMETER"}
            tif.write(tiles(), shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                      compression=compression, subfiletype=0 if k == 0 else 1, **kw)
    return path


class Mosaic:
    """Images placed on white glass in a grid of ``cell`` px (level 0) squares; ``layout[r][c]`` is an
    index into ``images`` or -1 for glass."""

    def __init__(self, images: Sequence[np.ndarray], layout: np.ndarray, cell: int):
        self.images, self.layout, self.cell = list(images), np.asarray(layout), cell
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    @property
    def shape(self) -> tuple[int, int]:
        return self.layout.shape[0] * self.cell, self.layout.shape[1] * self.cell

    def _image(self, i: int, d: int) -> np.ndarray:
        if (i, d) not in self._cache:
            side = self.cell // d
            self._cache[(i, d)] = np.asarray(Image.fromarray(self.images[i]).resize((side, side), Image.BILINEAR))
        return self._cache[(i, d)]

    def __call__(self, d: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        c = self.cell // d
        out = np.full((h, w, 3), 255, np.uint8)
        for r in range(y0 // c, (y0 + h - 1) // c + 1):
            for q in range(x0 // c, (x0 + w - 1) // c + 1):
                if r >= self.layout.shape[0] or q >= self.layout.shape[1] or self.layout[r, q] < 0:
                    continue
                img = self._image(int(self.layout[r, q]), d)
                ys, xs = max(y0, r * c), max(x0, q * c)
                ye, xe = min(y0 + h, (r + 1) * c), min(x0 + w, (q + 1) * c)
                out[ys - y0:ye - y0, xs - x0:xe - x0] = img[ys - r * c:ye - r * c, xs - q * c:xe - q * c]
        return out


def stain_images(n: int = 4, side: int = 256, seed: int = 0) -> list[np.ndarray]:
    """Synthetic H&E-like patches: pink stroma with purple nuclei blobs and noise (saturated, unlike glass)."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        a = np.empty((side, side, 3), np.float32)
        a[:] = (225, 140, 185) if k % 2 == 0 else (190, 110, 170)
        yy, xx = np.mgrid[:side, :side]
        for _ in range(30):
            cy, cx, rad = rng.integers(0, side, 2).tolist() + [int(rng.integers(4, 12))]
            a[(yy - cy) ** 2 + (xx - cx) ** 2 < rad ** 2] = (110, 60, 150)
        a += rng.normal(0, 8, a.shape)
        out.append(a.clip(0, 255).astype(np.uint8))
    return out
