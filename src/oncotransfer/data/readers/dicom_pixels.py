"""Decoded DICOM samples -> 8-bit grey or RGB as a viewer displays them: VOI windows, rescale, MONOCHROME1,
colour at 16 bits, and PALETTE COLOR lookup tables read in the object's own byte order.

pydicom's ``apply_color_lut`` reads (non-segmented) palette data with the machine's byte order: an object in
Explicit VR Big Endian (``OBXXXX1A_expb.dcm``: LUT words 0x0100, 0x0100, ... read as 1, 1, ...) decoded all
black. ``palette_to_rgb8`` applies the table itself, honouring the descriptor and the dataset's byte order.
"""
from __future__ import annotations

import numpy as np

__all__ = ["to_rgb8", "palette_to_rgb8", "lut16_to_8"]


def _window_range(ds) -> tuple[float, float]:
    """Output range of pydicom's windowing (PS3.3 C.11.2.1.2): the stored range, after rescale if any."""
    bits = int(ds.get("BitsStored", 8) or 8)
    if ds.get("ModalityLUTSequence"):
        lo, hi = 0.0, 2.0 ** ds.ModalityLUTSequence[0].LUTDescriptor[2] - 1
    elif int(ds.get("PixelRepresentation", 0) or 0) == 0:
        lo, hi = 0.0, 2.0 ** bits - 1
    else:
        lo, hi = -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = sorted((lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)))
    return lo, hi


def _stretch(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float64)
    if not hi > lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.clip(np.rint((arr - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)


def lut16_to_8(values: np.ndarray) -> np.ndarray:
    """16-bit LUT entries -> 8 bits as rint(v / 257): 0xFFFF -> 255, 0x8080 -> 128, the same rule as 16-bit RGB
    samples (``_stretch`` over 0..65535), so a palette image and its RGB twin agree."""
    return np.rint(np.asarray(values, dtype=np.float64) / 257).astype(np.uint8)


def _little_endian(ds) -> bool:
    enc = getattr(ds, "original_encoding", None)
    if enc and enc[1] is not None:
        return bool(enc[1])
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    return bool(getattr(uid, "is_little_endian", True)) if uid is not None else True


def _descriptor(ds, colour: str, signed: bool) -> tuple[int, int, int]:
    """(entries, first mapped value, bits) of one palette (PS3.3 C.7.6.3.1.5): 0 entries means 65536."""
    n, first, bits = (int(v) for v in ds[f"{colour}PaletteColorLookupTableDescriptor"].value[:3])
    n &= 0xFFFF  # a descriptor read as SS turns 65535 entries negative
    first = (first & 0xFFFF) if not signed else (first if first < 0x8000 else first - 0x10000)
    return (n or 65536), first, bits


def _table(ds, colour: str, n: int, bits: int) -> np.ndarray:
    """One palette's entries as 8-bit values."""
    value = ds[f"{colour}PaletteColorLookupTableData"].value
    if isinstance(value, (bytes, bytearray)):
        order = "<" if _little_endian(ds) else ">"
        if len(value) == n and bits == 8:  # 8-bit entries packed two to an OW word
            raw = np.frombuffer(value, np.uint8)
            if order == ">":  # big-endian OW swapped each word's two bytes
                raw = raw.reshape(-1, 2)[:, ::-1].reshape(-1) if len(raw) % 2 == 0 else raw
            return raw.copy()
        words = np.frombuffer(value[:len(value) // 2 * 2], f"{order}u2")
    else:  # an old object with the data as US/SS values
        words = np.asarray(value if isinstance(value, (list, tuple)) else [value], dtype=np.int64) & 0xFFFF
    if bits == 8:  # 8-bit entries in 16-bit words: the low byte, or the high one where a writer put them there
        return (words >> 8 if words.max(initial=0) > 255 else words).astype(np.uint8)
    return lut16_to_8(words)


def palette_to_rgb8(arr: np.ndarray, ds) -> np.ndarray:
    """PALETTE COLOR indices -> uint8 (H, W, 3). Values below the first mapped value take the first entry,
    above the last the last one (PS3.3 C.7.6.3.1.5); segmented palettes go through pydicom, which reads them
    in the dataset's byte order."""
    if "RedPaletteColorLookupTableData" not in ds:
        from pydicom.pixels import apply_color_lut
        rgb = apply_color_lut(arr, ds)[..., :3]
        return rgb if rgb.dtype == np.uint8 else lut16_to_8(rgb)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    out = np.empty(arr.shape + (3,), np.uint8)
    idx_src = np.asarray(arr, dtype=np.int64)
    for c, colour in enumerate(("Red", "Green", "Blue")):
        n, first, bits = _descriptor(ds, colour, signed)
        table = _table(ds, colour, n, bits)
        if len(table) < n:  # a short table: its own length bounds the indices
            n = max(1, len(table))
        out[..., c] = table[np.clip(idx_src - first, 0, n - 1)]
    return out


def to_rgb8(arr: np.ndarray, ds) -> np.ndarray:
    """One decoded frame -> uint8 (H, W) grey or (H, W, 3) RGB, as a viewer would display it."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    pi = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if pi == "PALETTE COLOR":
        return palette_to_rgb8(arr, ds)
    if arr.ndim == 3:  # colour: pydicom has already turned YBR_FULL / YBR_FULL_422 into RGB
        if arr.dtype == np.uint8:
            return arr
        return _stretch(arr, 0, 2 ** int(ds.get("BitsStored", 16) or 16) - 1)
    out = apply_modality_lut(arr, ds)  # rescale slope/intercept or a modality LUT
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        voi = apply_voi_lut(out, ds, index=0)
        if "VOILUTSequence" in ds and ds.VOILUTSequence:
            lo, hi = 0.0, 2.0 ** ds.VOILUTSequence[0].LUTDescriptor[2] - 1
        else:
            lo, hi = _window_range(ds)
        grey = _stretch(voi, lo, hi)
    elif out.dtype.kind == "u" and int(ds.get("BitsStored", 16) or 16) <= 8:
        grey = out.astype(np.uint8)  # 8-bit grey (most ultrasound): shown as stored, like the same image as PNG
    else:  # no display window stated: the used range stretched to 8 bits, as for 16-bit PNGs
        grey = _stretch(out, float(np.min(out)), float(np.max(out)))
    return 255 - grey if pi == "MONOCHROME1" else grey  # MONOCHROME1: low values are white
