"""DICOM objects -> 8-bit RGB frames, header facts for ``data inspect``, and salted hashes of patient ids.

Decoding goes through pydicom (a core dependency); compressed transfer syntaxes need its pixel-data plugins
(``pip install 'oncotransfer[dicom]'``: pylibjpeg with libjpeg, openjpeg and rle). An object that cannot be used
(not DICOM, truncated, no pixel data, a syntax without its plugin) raises ``ImageReadError`` with one line.

Raw PatientID, study and series UIDs never leave this module (PatientName is never read): the manifest holds
``hash_id(value)``, a keyed hash (HMAC-SHA256, 12 hex digits: a collision among 100,000 patients has odds of
about 1 in 56,000, and would only merge two patients' split groups) whose key is a secret kept outside run
directories (``ONCOTRANSFER_ID_SALT``, else a random key created once in ``~/.config/oncotransfer/id_salt``).
A key stored beside the hashes, or one derived from the data, would let anyone holding a report brute-force
short hospital ids; a per-user key keeps the same patient on the same hash across data sets, runs and
``data inspect`` on one machine (and across a team that shares ``ONCOTRANSFER_ID_SALT``).
"""
from __future__ import annotations

import functools
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from oncotransfer.data.readers.base import (FRAME_TAG, ImageReadError, ImageTooLargeError, Probe, Reader,
                                            one_line, split_frame)
from oncotransfer.data.readers.dicom_guard import HeaderBudget, check_frames, open_source
from oncotransfer.data.readers.dicom_ids import _CONTROL, MAX_ID, MIN_SALT, hash_id, identifier  # noqa: F401
from oncotransfer.data.readers.dicom_pixels import to_rgb8
from oncotransfer.data.readers.us_region import burned_in, crop_to_region, region_box
from oncotransfer.data.readers.pillow import IMAGE_SUFFIXES
from oncotransfer.errors import MissingExtraError

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
INSTALL_HINT = "pip install 'oncotransfer[dicom]'"
__all__ = ["MIN_SALT", "FRAME_TAG", "split_frame", "DicomReader", "read_info", "hash_id", "frames_for", "parse_frames", "to_rgb8",
           "NOT_IMAGES"]


# ---------------------------------------------------------------- recognising DICOM (no pydicom import)
def has_preamble(path: str | Path) -> bool:
    """The 128-byte preamble followed by ``DICM`` (DICOM Part 10)."""
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def is_dicom_path(path: str | Path) -> bool:
    """A DICOM suffix, a frame reference, or (for any name not ending in an image suffix) the DICM magic."""
    base, frame = split_frame(path)
    p = Path(base)
    suffix = p.suffix.lower()
    if frame is not None or suffix in DICOM_SUFFIXES:
        return True
    return suffix not in IMAGE_SUFFIXES and p.is_file() and has_preamble(p)


_VRS = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB", b"OD", b"OF",
        b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI", b"UL", b"UN",
        b"UR", b"US", b"UT", b"UV"}


def is_raw_dicom(head: bytes) -> bool:
    """A DICOM data set written without the 128-byte preamble and ``DICM`` (common in older PACS exports): it
    starts with an element of group 0002 (file meta) or 0008 (identification), explicit VR or implicit."""
    if len(head) < 8 or head[:2] not in (b"\x02\x00", b"\x08\x00") or head[3] != 0:
        return False
    return head[4:6] in _VRS or int.from_bytes(head[4:8], "little") < 1024  # a sane implicit-VR length


def is_dicom_bytes(data: bytes) -> bool:
    return data[128:132] == b"DICM"


def parse_frames(spec: str) -> tuple[str, int | None]:
    """``middle`` | ``all`` | ``index:N`` -> (kind, N); ValueError with the accepted forms otherwise."""
    if spec in ("middle", "all"):
        return spec, None
    if spec.startswith("index:") and spec[6:].isdigit():
        return "index", int(spec[6:])
    raise ValueError("expected 'middle', 'all' or 'index:N' (0-based frame of multi-frame objects)")


# ---------------------------------------------------------------- reading
def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise MissingExtraError(f"DICOM input needs pydicom: {INSTALL_HINT}") from None
    log = logging.getLogger("pydicom")
    if not log.handlers:  # its warnings would reach stderr through logging's last resort: reasons are one line
        log.addHandler(logging.NullHandler())
    return pydicom


def _quiet(fn):
    """pydicom warns on odd values (an IS of '1A'): silenced, since what matters is reported as one line."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)
    return wrapper


def _read(source, name: str, header_only: bool):
    """dcmread (forced: objects without preamble or file meta are common); ImageReadError when unusable."""
    pydicom = _pydicom()
    try:
        source, inflated = open_source(source, name)  # a deflated dataset is inflated here, within its budget
        if header_only and not inflated and isinstance(source, (str, Path)):
            with open(source, "rb") as f:  # a header that never ends (a file of zeros) stops at its budget
                ds = pydicom.dcmread(HeaderBudget(f, str(source)), force=True, defer_size="256 KB")
            ds.buffer, ds.filename, ds.fileobj_type = None, str(source), open  # deferred values: from the path
        else:
            ds = pydicom.dcmread(source, force=True, defer_size="256 KB" if header_only else None)
        if len(ds) == 0:
            raise ImageReadError(f"{name}: no DICOM data elements could be read (corrupt or not DICOM)")
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            kind = ds.get("Modality") or ds.get("SOPClassUID", getattr(ds, "file_meta", {}).get(
                "MediaStorageSOPClassUID", "unknown object"))
            raise ImageReadError(f"{name}: DICOM object without pixel data ({_clip(getattr(kind, 'name', kind))})")
        if "Rows" not in ds or "Columns" not in ds:
            raise ImageReadError(f"{name}: not a DICOM image (no Rows/Columns)")
        what = not_an_image(ds)
        if what:
            raise ImageReadError(f"{name}: {what}, not an image to classify")
        _fix_transfer_syntax(ds)
        check_frames(ds, name, n_frames(ds))
        return ds
    except ImageReadError:
        raise
    except Exception as e:  # pydicom raises many types on corrupt input: each becomes one line
        raise ImageReadError(f"{name}: unreadable DICOM ({one_line(e)})") from None


NOT_IMAGES = {
    "1.2.840.10008.5.1.4.1.1.66.4": ("a segmentation object", "SEG"),        # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.66.7": ("a segmentation object", "SEG"),        # Label Map Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.481.2": ("a radiotherapy dose grid", "RTDOSE"),  # RT Dose Storage
    "1.2.840.10008.5.1.4.1.1.30": ("a parametric map", "PMAP"),             # Parametric Map Storage
}
"""Objects with pixel data that are not pictures of a patient: masks, dose grids, computed maps. They decode
(a segmentation to near-black binary frames) and would train or be scored as if they were images."""


def not_an_image(ds) -> str | None:
    """``a segmentation object (SEG)`` when ``ds`` holds pixel data that is not an image, else None (by SOP
    class, else by modality for objects without one)."""
    uid = str(ds.get("SOPClassUID", "") or getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "") or "")
    if uid in NOT_IMAGES:
        what, code = NOT_IMAGES[uid]
        return f"{what} ({code})"
    modality = str(ds.get("Modality", "") or "").upper()
    for what, code in NOT_IMAGES.values():
        if modality == code:
            return f"{what} ({code})"
    return None


def _fix_transfer_syntax(ds) -> None:
    """Objects without file meta (read with force) state their encoding only implicitly."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        implicit = (ds.original_encoding[0] if getattr(ds, "original_encoding", None) else True)
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian


def n_frames(ds) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


@dataclass(frozen=True)
class DicomInfo:
    """Header facts of one object; identifiers are hashed (``hash_id``), never raw."""
    frames: int
    modality: str
    manufacturer: str
    bits_stored: int
    photometric: str
    transfer_syntax: str
    size: tuple[int, int]
    patient: str | None
    study: str | None
    series: str | None
    burned_in: bool = False
    """BurnedInAnnotation is YES: text or marks are part of the pixels."""
    us_region: bool = False
    """Declares a usable ultrasound image region (``us_region.region_box``)."""


def _shown(ds, key: str) -> str:
    """A header value ``data inspect`` prints: control characters as ``?``, 64 characters at most."""
    return _clip(ds.get(key, "") or "")


def _clip(value) -> str:
    v = _CONTROL.sub("?", str(value).strip()) or "?"
    return v if len(v) <= MAX_ID else v[:MAX_ID - 3] + "..."


@_quiet
def read_info(path: str | Path) -> DicomInfo:
    """Header of one object (pixel data not decoded); ImageReadError (one line) when it is unusable."""
    return _info(_read(str(path), str(path), header_only=True), path)


@_quiet  # pydicom's warnings on a bad UI or LO value quote it: a raw identifier must not reach the terminal
def _info(ds, path: str | Path) -> DicomInfo:
    ids = [identifier(ds, key, kind, path) for key, kind in
           (("PatientID", "p"), ("StudyInstanceUID", "st"), ("SeriesInstanceUID", "se"))]
    ts = ds.file_meta.TransferSyntaxUID
    try:
        return DicomInfo(n_frames(ds), _shown(ds, "Modality"), _shown(ds, "Manufacturer"),
                         int(ds.get("BitsStored", 0) or 0), _shown(ds, "PhotometricInterpretation"),
                         getattr(ts, "name", str(ts)), (int(ds.Columns), int(ds.Rows)), *ids, burned_in(ds),
                         region_box(ds) is not None)
    except Exception as e:  # a malformed header value
        raise ImageReadError(f"{path}: unreadable DICOM header ({one_line(e)})") from None


def frames_for(n: int, spec: str) -> list[int] | str:
    """Frame indices a policy takes from an object of ``n`` frames, or a one-line reason when none fit."""
    kind, k = parse_frames(spec)
    if n == 1:
        return [0]  # single-frame objects are their one frame under every policy
    if kind == "middle":
        return [n // 2]
    if kind == "all":
        return list(range(n))
    return [k] if k < n else f"data.dicom_frames {spec} but the object has {n} frames (0-{n - 1})"


def _decoder(uid):
    from pydicom.pixels import get_decoder
    return get_decoder(uid)


def _check_decoder(ds, name: str) -> None:
    uid = ds.file_meta.TransferSyntaxUID
    if not uid.is_compressed:
        return
    try:
        decoder = _decoder(uid)
    except NotImplementedError:
        raise ImageReadError(f"{name}: transfer syntax {uid.name} is not supported by any pydicom decoder") from None
    if not decoder.is_available:
        raise ImageReadError(f"{name}: transfer syntax {uid.name} needs a pixel-data plugin: {INSTALL_HINT}")


def probe_dicom(source: str | Path | bytes, max_pixels: int | None = None) -> tuple[int, int, int]:
    """(columns, rows, estimated peak decoded bytes of one frame) from the header; the pixel limit as in
    ``open_dicom``. Uploaded bytes are parsed whole (they are in memory already; the upload cap bounds them)."""
    return _probe(source, max_pixels)[1:]


@_quiet
def _probe(source: str | Path | bytes, max_pixels: int | None = None) -> tuple[Any, int, int, int]:
    """(header dataset, columns, rows, peak bytes): ``probe_dicom`` with the header kept for ``_info``."""
    name = "upload" if isinstance(source, bytes) else str(source)
    src = io.BytesIO(source) if isinstance(source, bytes) else split_frame(source)[0]
    try:
        src, inflated = open_source(src, name)
    except ImageReadError:
        raise
    except Exception as e:  # noqa: BLE001 - as in _read: pydicom raises many types on corrupt input
        raise ImageReadError(f"{name}: unreadable DICOM ({one_line(e)})") from None
    # a deflated object is held inflated while it decodes, and its pixel data copied out of that: both count
    # toward the decode budget (serve's --max-decode), or concurrent uploads of 128 MiB each would add up unseen
    held = 2 * len(src.getbuffer()) if inflated else 0
    ds = _read(src, name, header_only=True)
    rows, cols = int(ds.Rows), int(ds.Columns)
    if max_pixels is not None and rows * cols > max_pixels:
        raise ImageTooLargeError(f"{name}: image too large ({cols} x {rows} = {rows * cols} pixels per frame, "
                                 f"above the limit of {max_pixels})")
    # stored samples (up to 8 bytes as float64 during the VOI/rescale step) plus the RGB8 result
    return ds, cols, rows, held + rows * cols * (8 * int(ds.get("SamplesPerPixel", 1) or 1) + 3)


def open_dicom(source: str | Path | bytes, frame: int | None = None, max_pixels: int | None = None,
               us_region: bool = True) -> Image.Image:
    """One frame (``file#frame=K`` or ``frame``; default the middle one) -> RGB PIL image. A frame of more than
    ``max_pixels`` (Rows x Columns, read from the header) is refused before its pixel data is decoded.
    ``us_region``: an ultrasound object is cut to its declared image region (``us_region.crop_to_region``)."""
    if isinstance(source, bytes):
        name, src = "upload", io.BytesIO(source)
    else:
        base, tagged = split_frame(source)
        name, src, frame = str(source), base, (tagged if tagged is not None else frame)
    src, inflated = open_source(src, name)  # pydicom would re-inflate a deflated file whole for each frame
    on_disk = not isinstance(source, bytes) and not inflated
    ds = _read(src, name, header_only=on_disk)  # a file's pixel data stays on disk until one frame is read
    n = n_frames(ds)
    rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
    if max_pixels is not None and rows * cols > max_pixels:
        raise ImageTooLargeError(f"{name}: image too large ({cols} x {rows} = {rows * cols} pixels per frame, "
                                 f"above the limit of {max_pixels})")
    k = n // 2 if frame is None else frame
    if not 0 <= k < n:
        raise ImageReadError(f"{name}: frame {k} does not exist (the object has {n} frames)")
    from pydicom.pixels import pixel_array
    index = k if n > 1 else None
    try:
        _check_decoder(ds, name)
        try:
            # From the path pydicom reads frame k's bytes alone: 10 ms against 170 ms per frame of a 200-frame
            # 640x480 cine loop (61 MB) read whole each time (data.dicom_frames: all reads every frame).
            arr = pixel_array(src, index=index) if on_disk else pixel_array(ds, index=index)
        except Exception:  # e.g. no file meta (read with force): decode from the whole dataset instead
            if not on_disk:
                raise
            arr = pixel_array(_read(src, name, header_only=False), index=index)
        pixels = to_rgb8(arr, ds)
        if us_region:
            pixels = crop_to_region(pixels, ds)
    except ImageReadError:
        raise
    except Exception as e:
        raise ImageReadError(f"{name}: cannot decode pixel data ({one_line(e)})") from None
    if pixels.ndim == 3 and pixels.shape[-1] != 3:
        raise ImageReadError(f"{name}: unsupported pixel layout {pixels.shape} "
                             f"({ds.get('PhotometricInterpretation')})")
    return Image.fromarray(np.ascontiguousarray(pixels)).convert("RGB")


def summarise(paths: list[str]) -> dict:
    """``data inspect``'s facts over the distinct DICOM objects among ``paths`` (frame rows included; hashed ids only)."""
    from collections import Counter
    objects = sorted({split_frame(p)[0] for p in paths})
    keys = ("modality", "manufacturer", "frames", "bits_stored", "photometric", "transfer_syntax")
    out: dict = {k: Counter() for k in keys}
    out["burned_in"] = out["us_region"] = 0  # objects declaring burned-in annotation / a usable US region
    series: dict[tuple, int] = {}
    for p in objects:
        try:
            info = read_info(p)
        except ImageReadError:
            continue  # already listed as unreadable
        for k in keys:
            out[k][getattr(info, k)] += 1
        key = (info.patient or "-", info.study or "-", info.series or "-", info.modality)
        series[key] = series.get(key, 0) + 1
        out["burned_in"] += int(info.burned_in)
        out["us_region"] += int(info.us_region)
    out["objects"] = len(objects)
    out["patients"] = len({k[0] for k in series if k[0] != "-"})
    out["studies"] = len({k[1] for k in series if k[1] != "-"})
    out["series"] = series
    return out


class DicomReader(Reader):
    """DICOM objects (pydicom): any photometric interpretation, multi-frame objects one frame at a time."""
    name = "dicom"
    suffixes = frozenset(DICOM_SUFFIXES)
    framed = True

    def claims(self, path: Path, head: bytes) -> bool:
        suffix = path.suffix.lower()
        if suffix in DICOM_SUFFIXES:
            return True
        return suffix not in IMAGE_SUFFIXES and (head[128:132] == b"DICM" or (not suffix and is_raw_dicom(head)))

    def claims_bytes(self, data: bytes) -> bool:
        return is_dicom_bytes(data)

    def probe(self, source, max_pixels=None, draft_size=None) -> Probe:
        if isinstance(source, bytes):
            w, h, need = probe_dicom(source, max_pixels)
            return Probe(self.name, "image", w, h, peak_bytes=need)
        ds, w, h, need = _probe(source, max_pixels)  # one header read for the size and the info
        info = _info(ds, split_frame(source)[0])
        notes = ("declares burned-in annotation",) if info.burned_in else ()
        return Probe(self.name, "frames" if info.frames > 1 else "image", w, h, frames=info.frames,
                     mode=info.photometric, peak_bytes=need, group=info.patient, notes=notes)

    def decode(self, source, frame=None, max_pixels=None, draft_size=None, us_region=True) -> Image.Image:
        return open_dicom(source, frame, max_pixels, us_region)
