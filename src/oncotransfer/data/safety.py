"""Guards for hostile input files: non-regular files, decompression bombs refused by header size before decoding."""
from __future__ import annotations

import os
import stat
import struct
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from oncotransfer.data.dicom import is_dicom_path, probe_dicom, split_frame
from oncotransfer.data.images import MAX_PIXELS, ImageReadError

DEFAULT_MAX_PIXELS = MAX_PIXELS
"""About 8000 x 8000: ~190 MB decoded as RGB. Larger headers are refused unread (a 30000 x 30000 PNG header is 86
bytes). ``ONCOTRANSFER_MAX_PIXELS`` overrides it for ingestion (train, evaluate --data, data inspect)."""


def ingest_max_pixels() -> int:
    """The pixel limit for ingestion: ``ONCOTRANSFER_MAX_PIXELS`` when set to a positive integer, else the default."""
    raw = os.environ.get("ONCOTRANSFER_MAX_PIXELS", "").strip()
    if raw:
        try:
            value = int(raw.replace("_", ""))
        except ValueError:
            value = 0
        if value > 0:
            return value
        from oncotransfer.errors import ConfigError
        raise ConfigError(f"ONCOTRANSFER_MAX_PIXELS={raw!r}: expected a positive whole number of pixels")
    return DEFAULT_MAX_PIXELS


def check_pixels(img: Image.Image, limit: int | None, name: str = "image") -> None:
    """Raise ImageReadError when the image's declared size (header only, nothing decoded) exceeds ``limit``."""
    w, h = img.size
    if limit is not None and w * h > limit:
        raise ImageReadError(f"{name}: image too large: its header declares {w} x {h} = {w * h:,} pixels, above "
                             f"the limit of {limit:,} (set ONCOTRANSFER_MAX_PIXELS to allow more)")


def regular_file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as an image file (missing, a symlink loop, a device, a folder), or None."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as e:  # ELOOP for a symlink loop, ENOENT for a dangling link
        if p.is_symlink():
            return "a broken symbolic link or symlink loop"
        return f"cannot be read ({e.strerror or e})"
    if stat.S_ISDIR(st.st_mode):
        return "a folder, not an image file"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file (a device, pipe or socket)"
    return None


def probe(path: str | Path, limit: int | None) -> tuple[int, int, str]:
    """(width, height, mode) from the header only; ImageReadError (one line, naming the file) when the file is
    not a regular file, not an image, or declares more than ``limit`` pixels."""
    name = str(path)
    if is_dicom_path(path):  # DICOM (``file#frame=K`` included): Rows x Columns from its header
        why = regular_file_problem(split_frame(path)[0])
        if why:
            raise ImageReadError(f"{name}: {why}")
        w, h, _ = probe_dicom(path, limit)
        return w, h, "DICOM"
    why = regular_file_problem(path)
    if why:
        raise ImageReadError(f"{name}: {why}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides below
            with Image.open(path) as img:
                check_pixels(img, limit, name)
                return img.size[0], img.size[1], img.mode
    except Image.DecompressionBombError as e:  # Pillow's own hard limit, hit inside Image.open
        raise ImageReadError(f"{name}: image too large ({e})") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{name}: not an image Pillow can read") from None
    except ImageReadError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
        raise ImageReadError(f"{name}: unreadable or truncated image ({str(e)[:80]})") from None


def decode_failure(name: str, e: Exception) -> str:
    """One line for an exception a decoder raised on hostile bytes that Pillow does not map to OSError
    (IndexError, ZeroDivisionError, ... inside a plugin): the file is named and skipped, never a traceback."""
    return f"{name}: unreadable or malformed image ({type(e).__name__}: {str(e)[:80]})"
