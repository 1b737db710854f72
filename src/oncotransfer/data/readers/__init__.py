"""One reader per file format, behind one interface (``Reader``: ``claims``, ``probe``, ``decode``).

Every caller that opens a file (ingestion, ``data inspect``, checks, train, predict, serve, slides) goes through
``reader_for`` / ``probe`` / ``open_rgb`` here. Adding a format is one module with a ``Reader`` subclass and one
``register`` line below (see CONTRIBUTING.md, "Adding a file format").
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Iterable

from PIL import Image

from oncotransfer.data.readers.base import (DEFAULT_MAX_PIXELS, FRAME_TAG, MAX_PIXELS, ImageReadError,
                                            ImageTooLargeError, Probe, Reader, decode_failure, file_too_large,
                                            ingest_max_pixels,
                                            read_head, regular_file_problem, source_name, split_frame)
from oncotransfer.data.readers.dicom import DicomReader
from oncotransfer.data.readers.nifti import NiftiReader
from oncotransfer.data.readers.pillow import IMAGE_SUFFIXES, PillowReader
from oncotransfer.data.readers.slide import SlideError, SlideReader
from oncotransfer.errors import ConfigError, MissingExtraError

__all__ = ["READERS", "expand_paths", "Reader", "Probe", "ImageReadError", "ImageTooLargeError", "SlideError", "MAX_PIXELS",
           "DEFAULT_MAX_PIXELS", "FRAME_TAG", "IMAGE_SUFFIXES", "register", "get_reader", "reader_for", "probe",
           "open_rgb", "is_readable_name", "split_frame", "regular_file_problem", "ingest_max_pixels",
           "decode_failure", "known_suffixes", "too_large_reason"]

READERS: dict[str, Reader] = {}
"""Registered readers in the order they are asked: specific formats before Pillow, the catch-all."""


def register(reader: Reader) -> Reader:
    """Add ``reader`` to the registry. Readers are asked in registration order, except Pillow, the catch-all
    for images, which stays last."""
    READERS[reader.name] = reader
    if "pillow" in READERS and reader.name != "pillow":  # keep the catch-all last
        READERS["pillow"] = READERS.pop("pillow")
    return reader


for _r in (SlideReader(), DicomReader(), NiftiReader(), PillowReader()):
    register(_r)


def get_reader(name: str) -> Reader:
    try:
        return READERS[name]
    except KeyError:
        close = difflib.get_close_matches(name, READERS, n=3)
        raise ConfigError(f"unknown reader {name!r}" + (f"; did you mean {close}?" if close else "")
                          + f" (registered: {', '.join(READERS)})") from None


def known_suffixes() -> set[str]:
    return {s for r in READERS.values() for s in r.suffixes}


def reader_for(source: str | Path | bytes) -> Reader:
    """The reader that owns ``source`` (a path, ``file#frame=K``, or uploaded bytes). ``ImageReadError`` when
    the path is not a regular file; a file no specific reader claims goes to Pillow, which names what it is not."""
    if isinstance(source, bytes):
        return next(r for r in READERS.values() if r.claims_bytes(source))
    base, _ = split_frame(source)
    why = regular_file_problem(base)
    if why:
        raise ImageReadError(f"{source}: {why}")
    path, head = Path(base), read_head(base, 1024)
    reader = next((r for r in READERS.values() if r.name != "pillow" and r.claims(path, head)), READERS["pillow"])
    big = None if reader.name == "slide" else file_too_large(base)  # slides are tiled, never read whole
    if big:
        raise ImageTooLargeError(f"{source}: {big}")
    return reader


def is_readable_name(path: str | Path) -> bool:
    """Whether a file found in a class folder is one some reader owns: by name, or, for a name without a
    suffix, by its signature (DICOM with or without preamble, an image format)."""
    p = Path(path)
    if any(p.name.lower().endswith(s) for s in known_suffixes()):
        return True
    if p.suffix or not p.is_file():
        return False
    head = read_head(p, 1024)
    return any(r.claims(p, head) for r in READERS.values())


def expand_paths(paths: Iterable[str | Path]) -> tuple[list[Path], dict[str, str]]:
    """Files as given, folders walked recursively for the files some reader owns; missing paths become errors."""
    out: list[Path] = []
    errors: dict[str, str] = {}
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_readable_name(f))
            if not found:
                errors[str(p)] = f"{p}: folder holds no images ({', '.join(sorted(known_suffixes()))})"
            out += found
        elif p.is_file():
            out.append(p)
        else:
            errors[str(p)] = f"{p}: no such file or folder"
    return out, errors


def probe(source: str | Path | bytes, max_pixels: int | None = None, draft_size: int | None = None) -> Probe:
    """Header facts of ``source`` from its reader, nothing decoded; ``ImageReadError`` (one line) otherwise."""
    reader = reader_for(source)
    try:
        return reader.probe(source if isinstance(source, bytes) else str(source), max_pixels, draft_size)
    except (ImageReadError, MissingExtraError):  # a missing extra stops the command, not one file at a time
        raise
    except Exception as e:  # noqa: BLE001 - hostile bytes can break a decoder plugin in any way
        raise ImageReadError(decode_failure(source_name(source), e)) from None


def too_large_reason(source: str | Path, max_pixels: int = MAX_PIXELS) -> str | None:
    """Why ``source`` is refused from its size on disk or its header's pixel count, or None (a decoder of its
    own, such as OpenCV's in ``cells extract``, then reads it): the one pixel limit for every decoder."""
    try:
        probe(source, max_pixels=max_pixels)
    except ImageTooLargeError as e:
        return str(e).replace(f"{source}: ", "", 1)
    except ImageReadError:
        pass
    return None


def open_rgb(source: str | Path | bytes, draft_size: int | None = None, max_pixels: int | None = None,
             frame: int | None = None, us_region: bool = True, grey: bool = False) -> Image.Image:
    """Decode one frame of ``source`` fully to RGB through its reader. ``file#frame=K`` picks frame K, else
    ``frame``, else the middle one. A header declaring more than ``max_pixels`` (None: the reader's own bomb
    limit) raises ``ImageTooLargeError`` before decoding; anything unusable raises ``ImageReadError``.
    ``grey``: a single-channel frame may stay mode ``L`` (``Reader.decode_grey``: the same pixels, cheaper)."""
    reader = reader_for(source)
    decode = reader.decode_grey if grey else reader.decode
    try:
        return decode(source if isinstance(source, bytes) else str(source), frame, max_pixels, draft_size, us_region)
    except (ImageReadError, MissingExtraError):
        raise
    except Exception as e:  # noqa: BLE001
        raise ImageReadError(decode_failure(source_name(source), e)) from None
