"""Plain images through Pillow: PNG, JPEG, TIFF, BMP, GIF, WebP, in any mode -> RGB with EXIF orientation."""
from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from oncotransfer.data.readers.base import (ImageReadError, ImageTooLargeError, Probe, Reader, check_pixels,
                                            has_suffix, source_name)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
_HIGH_BIT = ("I;16", "I;16B", "I;16L", "I", "F")


def _bpp(mode: str) -> int:
    """Bytes a decoded pixel takes in Pillow ``mode`` (16-bit and float modes count their float32 stretch)."""
    if mode in _HIGH_BIT:
        return 4 + 4 + 1  # native, float32 stretch, 8-bit result
    try:
        bands = Image.getmodebands(mode)
    except (KeyError, ValueError):
        bands = 4
    return bands + (8 if mode in ("RGBA", "LA", "PA", "La", "RGBa") else 0)  # alpha: RGBA copy + composite


def _open(source: str | Path | bytes, max_pixels: int | None) -> Image.Image:
    """Image.open (header only, no decoding) with the pixel limit applied; errors as ImageReadError."""
    name = source_name(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(f"{name}: image too large ({e})") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{name}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise ImageReadError(f"{name}: unreadable or truncated image ({str(e)[:80]})") from None
    try:
        check_pixels(*img.size, max_pixels, name)
    except ImageTooLargeError:
        img.close()
        raise
    return img


def to_rgb(img: Image.Image, keep_grey: bool = False) -> Image.Image:
    """Any Pillow mode -> RGB: EXIF orientation applied, 16-bit and float stretched over their used range,
    transparency composited over white. ``keep_grey``: an 8-bit grey result stays ``L`` (``decode_grey``)."""
    # In place: the freshly decoded image is ours, and a copy would add a full-size frame to the peak.
    ImageOps.exif_transpose(img, in_place=True)
    if img.mode in _HIGH_BIT:
        # 16-bit and float images: stretch the used range to 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return img if keep_grey and img.mode == "L" else img.convert("RGB")


IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"GIF87a", b"GIF89a", b"BM")


def has_image_magic(head: bytes) -> bool:
    """The signature of a format Pillow reads (PNG, JPEG, TIFF, GIF, BMP, WebP) at the start of a file."""
    return head.startswith(IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


class PillowReader(Reader):
    name = "pillow"
    suffixes = frozenset(IMAGE_SUFFIXES)

    def claims(self, path: Path, head: bytes) -> bool:
        # a file without a suffix (PACS exports, renamed files) is an image when it starts like one
        return has_suffix(path, self.suffixes) or (not path.suffix and has_image_magic(head))

    def claims_bytes(self, data: bytes) -> bool:
        return True  # the fallback for uploads: Pillow identifies the format from the bytes

    def probe(self, source, max_pixels=None, draft_size=None) -> Probe:
        with _open(source, max_pixels) as img:
            w, h = img.size
            mode = img.mode
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            dw, dh = img.size
            frames = int(getattr(img, "n_frames", 1) or 1)
        # the native decode plus its RGB conversion
        return Probe(self.name, "image", w, h, frames=frames, mode=mode, peak_bytes=dw * dh * (_bpp(mode) + 3))

    def decode(self, source, frame=None, max_pixels=None, draft_size=None, us_region=True) -> Image.Image:
        return self._decode(source, max_pixels, draft_size, keep_grey=False)

    def decode_grey(self, source, frame=None, max_pixels=None, draft_size=None, us_region=True) -> Image.Image:
        return self._decode(source, max_pixels, draft_size, keep_grey=True)

    def _decode(self, source, max_pixels, draft_size, keep_grey: bool) -> Image.Image:
        name = source_name(source)
        img = _open(source, max_pixels)
        try:
            with warnings.catch_warnings():
                # A decompression-bomb warning is an error for us: a 20000x20000 PNG must not be decoded.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                if draft_size and img.format == "JPEG":
                    img.draft("RGB", (draft_size, draft_size))  # libjpeg decodes at 1/2..1/8 scale: much faster
                img.load()
                return to_rgb(img, keep_grey)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageTooLargeError(f"{name}: image too large ({e})") from None
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
            raise ImageReadError(f"{name}: unreadable or truncated image ({str(e)[:80]})") from None


def is_image_name(path: str | Path) -> bool:
    return has_suffix(path, IMAGE_SUFFIXES)
