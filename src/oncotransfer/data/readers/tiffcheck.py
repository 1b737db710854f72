"""The structure of a TIFF-based slide, checked before OpenSlide or tifffile parse it: its chain of image file
directories (IFDs) must end, and every IFD and tile must lie inside the file.

Both libraries stop quietly at an IFD chain that points back (libtiff: "IFD looping detected", tifffile: a
logged warning), then tile the levels they kept; and a truncated file fails only when a missing tile is
decoded, deep in a thread pool. One line naming the damage, before any tile is read, is the answer to both.
"""
from __future__ import annotations

import struct
from pathlib import Path

from oncotransfer.data.readers.base import ImageReadError

MAX_IFDS = 10_000
"""More directories than any slide holds (a few levels plus label/macro images): a longer chain is damage."""
_TYPES = {3: ("H", 2), 4: ("I", 4), 16: ("Q", 8)}  # SHORT, LONG, LONG8: the types offsets and counts use
_DATA_TAGS = ((324, 325), (273, 279))  # TileOffsets/TileByteCounts, StripOffsets/StripByteCounts


class TiffStructureError(ImageReadError):
    """A TIFF whose directory chain loops, or whose directories or tiles lie past its end."""


def check_tiff(path: str | Path) -> None:
    """Raise ``TiffStructureError`` (one line naming the damage) for a looping or truncated TIFF; a file that is
    not a TIFF, or an NDPI (offsets past 4 GB wrap), is left to its reader."""
    path = Path(path)
    if path.suffix.lower() == ".ndpi":
        return
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(0)
        head = f.read(16)
        order = {b"II": "<", b"MM": ">"}.get(head[:2])
        if order is None or len(head) < 8:
            return
        magic = struct.unpack_from(order + "H", head, 2)[0]
        if magic == 42:
            big, first = False, struct.unpack_from(order + "I", head, 4)[0]
        elif magic == 43 and len(head) >= 16:
            big, first = True, struct.unpack_from(order + "Q", head, 8)[0]
        else:
            return
        seen: dict[int, int] = {}
        offset = first
        while offset:
            if offset in seen:
                raise TiffStructureError(f"{path}: damaged TIFF: its directory chain loops back to IFD "
                                         f"{seen[offset]} (offset {offset}) after {len(seen)} IFDs")
            if len(seen) >= MAX_IFDS:
                raise TiffStructureError(f"{path}: damaged TIFF: more than {MAX_IFDS} IFDs")
            if offset + (8 if big else 2) > size:
                raise TiffStructureError(f"{path}: truncated TIFF: IFD {len(seen)} at offset {offset} lies past "
                                         f"the end of the file ({size} bytes)")
            seen[offset] = len(seen)
            offset = _check_ifd(f, order, big, offset, size, path, len(seen) - 1)


def _check_ifd(f, order: str, big: bool, offset: int, size: int, path: Path, index: int) -> int:
    """Check one IFD's tiles (or strips) against the file's size; returns the next IFD's offset."""
    f.seek(offset)
    count = struct.unpack(order + ("Q" if big else "H"), f.read(8 if big else 2))[0]
    entry, ptr = (20, "Q") if big else (12, "I")
    raw = f.read(count * entry + (8 if big else 4))
    if len(raw) < count * entry + (8 if big else 4):
        raise TiffStructureError(f"{path}: truncated TIFF: IFD {index} at offset {offset} is cut off by the end of "
                                 f"the file ({size} bytes)")
    tags = {}
    for k in range(count):
        e = raw[k * entry:(k + 1) * entry]
        tag, typ = struct.unpack_from(order + "HH", e)
        n = struct.unpack_from(order + ("Q" if big else "I"), e, 4)[0]
        tags[tag] = (typ, n, e[12 if big else 8:])
    for off_tag, cnt_tag in _DATA_TAGS:
        if off_tag in tags and cnt_tag in tags:
            offs, cnts = _values(f, order, big, tags[off_tag]), _values(f, order, big, tags[cnt_tag])
            if offs is None or cnts is None:
                continue
            end = max((o + c for o, c in zip(offs, cnts) if c), default=0)
            if end > size:
                raise TiffStructureError(f"{path}: truncated TIFF: tiles of IFD {index} end at byte {end}, past the "
                                         f"end of the file ({size} bytes)")
            break
    return struct.unpack_from(order + ptr, raw, count * entry)[0]


def _values(f, order: str, big: bool, tag: tuple[int, int, bytes]) -> list[int] | None:
    """An offsets/counts array, inline or at its offset (None: a type those tags never have)."""
    typ, n, field = tag
    if typ not in _TYPES or n > 50_000_000:
        return None
    fmt, width = _TYPES[typ]
    if n * width <= len(field):
        data = field[:n * width]
    else:
        f.seek(struct.unpack_from(order + ("Q" if big else "I"), field)[0])
        data = f.read(n * width)
        if len(data) < n * width:
            return [2 ** 63]  # the array itself lies past the end: truncated
    return list(struct.unpack(order + fmt * n, data))
