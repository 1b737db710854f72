"""Damaged pyramidal TIFFs for tests and benchmarks: a corrupt tile at a level, a truncated file, an IFD loop.

Each works on a file written by ``slidegen.write_slide`` (successive IFDs, one per level, JPEG or raw tiles).
"""
from __future__ import annotations

import struct
from pathlib import Path


def _pages(path: Path) -> list[tuple[int, list[int], list[int]]]:
    """(IFD offset, tile offsets, tile byte counts) per level."""
    import tifffile
    with tifffile.TiffFile(path) as tf:
        return [(p.offset, list(p.dataoffsets), list(p.databytecounts)) for p in tf.pages]


def corrupt_tile(path: Path, level: int = 0, tile: int = 0, fill: bytes = b"\xff\xd9") -> Path:
    """Overwrite the middle of one tile's bytes (``tile`` in the level's raster order) with ``fill`` repeated:
    a JPEG tile then fails to decode; ``level=-1`` is the lowest level (the thumbnail)."""
    _, offs, counts = _pages(path)[level]
    start, n = offs[tile], counts[tile]
    data = bytearray(Path(path).read_bytes())
    a, b = start + 2, start + n - 2  # keep the SOI marker: a decoder starts and then fails mid-tile
    data[a:b] = (fill * (n // len(fill) + 1))[:b - a]
    Path(path).write_bytes(bytes(data))
    return path


def truncate(path: Path, fraction: float) -> Path:
    """Cut the file to ``fraction`` of its length."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:int(len(data) * fraction)])
    return path


def ifd_loop(path: Path, back_to: int = 0) -> Path:
    """Point the last IFD's next-IFD offset back at IFD ``back_to``: a chain that never ends (classic TIFF)."""
    pages = _pages(path)
    data = bytearray(Path(path).read_bytes())
    assert data[:4] == b"II*\x00", "classic little-endian TIFF expected"
    last = pages[-1][0]
    n = struct.unpack_from("<H", data, last)[0]
    struct.pack_into("<I", data, last + 2 + 12 * n, pages[back_to][0])
    Path(path).write_bytes(bytes(data))
    return path
