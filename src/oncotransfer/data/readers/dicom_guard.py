"""Budgets checked before pydicom allocates for a DICOM object (``oncotransfer.limits``).

pydicom inflates a Deflated Explicit VR Little Endian dataset whole with ``zlib.decompress`` (a 2.5 MB object
becomes 2.5 GB before one element is read), trusts NumberOfFrames (10^9 frames in 4 KB of pixel data), and
parses a file of zeros as endless empty elements. ``open_source`` inflates with a ceiling, ``HeaderBudget``
stops a header that never ends, and ``check_frames`` compares the declared frames with the pixel data.
"""
from __future__ import annotations

import io
import zlib
from pathlib import Path
from typing import BinaryIO

from oncotransfer.data.readers.base import ImageReadError
from oncotransfer.limits import MAX_FRAMES, MAX_HEADER_BYTES, MAX_HEADER_READS, MAX_INFLATED_BYTES

DEFLATED = "1.2.840.10008.1.2.1.99"


class HeaderBudget(io.RawIOBase):
    """A read-only file whose ``read`` calls may return at most ``limit`` bytes in ``max_reads`` calls in all
    (seeks are free, so deferred values and pixel data skipped by offset cost nothing); past either,
    ``ImageReadError``. pydicom parses about 30,000 empty elements a second: the call count is what ends a file
    of zeros in seconds rather than hours."""

    def __init__(self, f: BinaryIO, name: str, limit: int | None = None, max_reads: int | None = None) -> None:
        self.f, self.name, self.used, self.reads = f, name, 0, 0
        self.limit = MAX_HEADER_BYTES if limit is None else limit
        self.max_reads = MAX_HEADER_READS if max_reads is None else max_reads

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.used += len(data)
        self.reads += 1
        if self.used > self.limit or self.reads > self.max_reads:
            raise ImageReadError(f"{self.name}: DICOM header runs past {self.limit >> 20} MiB or "
                                 f"{self.max_reads:,} reads of data elements before the pixel data (corrupt, "
                                 "or a file of zeros); refused")
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos, whence)

    def tell(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        self.f.close()
        super().close()


def _meta(f: BinaryIO):
    """(file meta dataset, offset of the dataset) after an optional preamble; (None, 0) without file meta."""
    from pydicom.filereader import _read_file_meta_info
    head = f.read(132)
    if head[128:132] != b"DICM":
        f.seek(0)
    if f.read(2) != b"\x02\x00":
        return None, 0
    f.seek(-2, 1)
    meta = _read_file_meta_info(f)
    return meta, f.tell()


def inflate(data: bytes, name: str, limit: int | None = None) -> bytes:
    """Raw-deflate ``data`` into at most ``limit`` (``MAX_INFLATED_BYTES``) bytes; ``ImageReadError`` beyond it."""
    limit = MAX_INFLATED_BYTES if limit is None else limit
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = d.decompress(data, limit + 1)
    except zlib.error as e:
        raise ImageReadError(f"{name}: damaged deflated DICOM data ({e})") from None
    if len(out) > limit or d.unconsumed_tail:
        raise ImageReadError(f"{name}: deflated DICOM dataset inflates to more than {limit >> 20} MiB "
                             f"({len(data):,} bytes on disk); refused before decoding (a decompression bomb)")
    return out


def open_source(source: str | Path | BinaryIO, name: str) -> tuple[str | Path | BinaryIO, bool]:
    """``(source, False)`` for any object but a deflated one, which comes back inflated (within
    ``MAX_INFLATED_BYTES``) and re-labelled Explicit VR Little Endian as an in-memory stream: ``(stream, True)``."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian
    f = open(source, "rb") if isinstance(source, (str, Path)) else source
    start = f.tell()
    try:
        meta, at = _meta(f)
        if meta is None or str(meta.get("TransferSyntaxUID", "")) != DEFLATED:
            f.seek(start)
            return source, False
        body = inflate(f.read(), name)
    except ImageReadError:
        raise
    except Exception:  # noqa: BLE001 - an unreadable meta group: pydicom's own read names the problem
        f.seek(start)
        return source, False
    finally:
        if f is not source:
            f.close()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, False
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=False)
    return io.BytesIO(out.getvalue() + body), True


def pixel_bytes(ds) -> int | None:
    """Bytes of stored pixel data: the value's length, or None when it is deferred or absent."""
    for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if key in ds:
            elem = ds.get_item(key)
            length = getattr(elem, "length", None)
            if length is None or length == 0xFFFFFFFF:
                value = getattr(elem, "value", None)
                return len(value) if isinstance(value, (bytes, bytearray)) else None
            return int(length)
    return None


def check_frames(ds, name: str, frames: int) -> None:
    """``ImageReadError`` when ``frames`` exceeds ``MAX_FRAMES`` or, for native (uncompressed) pixel data, what
    the stored bytes can hold."""
    if frames > MAX_FRAMES:
        raise ImageReadError(f"{name}: declares {frames:,} frames, above the limit of {MAX_FRAMES:,}; refused")
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    stored = pixel_bytes(ds)
    if frames <= 1 or stored is None or uid is None or getattr(uid, "is_compressed", True):
        return  # one frame that is short is the decoder's to name
    try:  # one sample a pixel at least: chroma-subsampled YBR_FULL_422 stores 2 bytes a pixel, not 3
        rows, cols = int(ds.Rows), int(ds.Columns)
        per = rows * cols * max(1, int(ds.get("BitsAllocated", 8) or 8))
    except (TypeError, ValueError, AttributeError):
        return
    if per and frames * per > stored * 8 + 8 * 8:  # bits; one padding byte allowed
        fit = stored * 8 // per
        raise ImageReadError(f"{name}: declares {frames:,} frames of {cols} x {rows} but its pixel data holds "
                             f"{fit:,} ({stored:,} bytes); truncated or a forged NumberOfFrames")
