"""What every reader shares: the ``Reader`` interface, the ``Probe`` it returns, its errors, and the guards that
run before any decoder sees a file (regular files only, a pixel limit read from the header).

Nothing here imports PyTorch or another ``oncotransfer.data`` module: the readers sit below everything that
decodes images (ingestion, inspect, train, predict, serve, slides), and those import them, never the reverse.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from PIL import Image

from oncotransfer.errors import ConfigError, DataError
from oncotransfer.limits import MAX_FILE_BYTES, MAX_PIXELS

DEFAULT_MAX_PIXELS = MAX_PIXELS
"""The one refusal threshold (``oncotransfer.limits.MAX_PIXELS``: ingestion, ``predict``, ``serve``), so
whatever a model trained on it can also score."""
FRAME_TAG = "#frame="
"""Rows of a multi-frame object (a DICOM cine loop, a NIfTI volume's slices) name their frame:
``path/to/object.dcm#frame=7`` (0-based)."""


class ImageReadError(DataError):
    """One file could not be read (unreadable, truncated, a decompression bomb, not an image to classify)."""


class ImageTooLargeError(ImageReadError):
    """The header declares more pixels than allowed: refused before any pixel is decoded."""


@dataclass(frozen=True)
class Probe:
    """What a reader learns from a file's header alone, without decoding its pixels."""
    reader: str
    """The registry name of the reader that owns the file (``pillow``, ``dicom``, ``slide``, ``nifti``...)."""
    kind: str
    """``image`` (one picture), ``frames`` (a DICOM cine loop or multi-frame object), ``volume`` (slices of a
    3-D scan) or ``slide`` (a whole-slide pyramid: tiled, never decoded whole)."""
    width: int
    height: int
    frames: int = 1
    mode: str = ""
    """Pillow mode, DICOM photometric interpretation, or NIfTI data type."""
    mpp: float | None = None
    """Level-0 microns per pixel when the file records a plausible one."""
    peak_bytes: int = 0
    """Estimated peak memory of decoding one frame (what the pixel and memory limits check)."""
    group: str | None = None
    """The unit no split may cut, when the file knows one: a DICOM object's hashed PatientID, a volume's name."""
    notes: tuple[str, ...] = field(default=())
    """Facts a user should hear (``declares burned-in annotation``...)."""


class Reader:
    """One file format. Subclasses set ``name`` and ``suffixes`` and implement ``probe`` and ``decode``;
    ``register`` (``oncotransfer.data.readers``) adds an instance to the registry.

    ``claims`` decides from the name and the first bytes whether a file is this format; the registry asks the
    readers in order (slides, DICOM, volumes, then Pillow), so a specific reader can claim what a generic one
    also could (a pyramidal ``.tif``). Every failure is an ``ImageReadError`` whose message names the file and
    says why in one line."""

    name: ClassVar[str] = ""
    suffixes: ClassVar[frozenset[str]] = frozenset()
    """Lower-case name endings (``.nii.gz`` included): files in class folders with these are this format's."""
    framed: ClassVar[bool] = False
    """Files may hold several frames or slices that become one manifest row each (``file#frame=K``)."""

    def claims(self, path: Path, head: bytes) -> bool:
        """True when ``path`` (whose first 1024 bytes are ``head``) is this reader's format."""
        return has_suffix(path, self.suffixes)

    def claims_bytes(self, data: bytes) -> bool:
        """True when uploaded ``data`` (``serve``) is this reader's format."""
        return False

    def probe(self, source: str | Path | bytes, max_pixels: int | None = None, draft_size: int | None = None
              ) -> Probe:
        """Header facts; ``ImageTooLargeError`` when one frame declares more than ``max_pixels`` pixels.
        ``draft_size``: the decode will be asked for at least this many pixels a side (a JPEG then decodes
        at 1/2..1/8 scale, which ``peak_bytes`` counts)."""
        raise NotImplementedError

    def decode(self, source: str | Path | bytes, frame: int | None = None, max_pixels: int | None = None,
               draft_size: int | None = None, us_region: bool = True) -> Image.Image:
        """One frame (``frame``; the middle one when None) as an RGB image, as a viewer would show it."""
        raise NotImplementedError

    def decode_grey(self, source: str | Path | bytes, frame: int | None = None, max_pixels: int | None = None,
                    draft_size: int | None = None, us_region: bool = True) -> Image.Image:
        """``decode``, except that a single-channel frame may come back in mode ``L``: the same pixels as its
        RGB conversion (every band equal), a third of the work to resize. Readers without the shortcut decode."""
        return self.decode(source, frame, max_pixels, draft_size, us_region)


def has_suffix(path: str | Path, suffixes: frozenset[str] | set[str]) -> bool:
    name = Path(path).name.lower()
    return any(name.endswith(s) for s in suffixes)


def source_name(source: str | Path | bytes) -> str:
    return "upload" if isinstance(source, bytes) else str(source)


def split_frame(source: str | Path) -> tuple[str, int | None]:
    """``file#frame=K`` -> (file, K); anything else -> (source, None)."""
    s = str(source)
    base, tag, k = s.rpartition(FRAME_TAG)
    if tag and k.isdigit():
        return base, int(k)
    return s, None


def one_line(e: BaseException, limit: int = 160) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
        raise ConfigError(f"ONCOTRANSFER_MAX_PIXELS={raw!r}: expected a positive whole number of pixels")
    return DEFAULT_MAX_PIXELS


def check_pixels(width: int, height: int, limit: int | None, name: str, per: str = "") -> None:
    """``ImageTooLargeError`` when a declared size (header only, nothing decoded) exceeds ``limit``."""
    if limit is not None and width * height > limit:
        raise ImageTooLargeError(f"{name}: image too large: its header declares {width} x {height} = "
                                 f"{width * height:,} pixels{per}, above the limit of {limit:,}; refused before decoding (set "
                                 "ONCOTRANSFER_MAX_PIXELS to allow more)")


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


def file_too_large(path: str | Path, limit: int = MAX_FILE_BYTES) -> str | None:
    """Why a file is refused from its size on disk alone (a sparse terabyte file under an image name), or None."""
    try:
        size = os.stat(path).st_size
    except OSError:
        return None
    if size <= limit:
        return None
    return (f"file too large: {size:,} bytes on disk, above the limit of {limit:,} for one image, DICOM object "
            "or volume (oncotransfer.limits.MAX_FILE_BYTES); refused before reading")


def decode_failure(name: str, e: Exception) -> str:
    """One line for an exception a decoder raised on hostile bytes that it does not map to OSError
    (IndexError, ZeroDivisionError, ... inside a plugin): the file is named and skipped, never a traceback."""
    return f"{name}: unreadable or malformed image ({type(e).__name__}: {str(e)[:80]})"


def read_head(path: str | Path, n: int = 132) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""
