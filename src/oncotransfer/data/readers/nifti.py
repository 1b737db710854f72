"""NIfTI-1/2 volumes (``.nii``, ``.nii.gz``) through nibabel, one slice at a time.

Frames are the slices along the last spatial axis (a 2-D image is one frame; of a 4-D series only the first
volume, time point 0, is read). ``probe`` reads the header alone; ``decode`` reads one slice through nibabel's
array proxy (``dataobj``: scl_slope / scl_inter applied, nothing else of the volume in memory), so a 300-slice
CT never sits in memory whole. A slice of a ``.nii.gz`` still costs decompressing the stream up to it (gzip has
no random access unless ``indexed_gzip`` is installed), which is why ``data.dicom_frames: all`` on large
compressed volumes is slower than on ``.nii`` files.

Display, the same for every slice of a volume:

- Orientation: each in-plane voxel axis is first flipped where the affine says it runs against RAS+ (a volume
  stored LAS, FSL's radiological layout, then looks like one stored RAS), then the slice is shown the way a
  radiologist reads an axial image: anterior at the top, the patient's right on the viewer's left
  (``display = slice[::-1, ::-1].T`` for a RAS slice). Axes are never swapped or resampled: a sagittal
  acquisition stays sagittal, and anisotropic voxels are shown square.
- Intensity: the header's ``cal_min``/``cal_max`` when they form a valid range, else the 0.5 and 99.5
  percentiles of the whole volume, computed once per file (cached by path, mtime and size). A per-slice stretch
  would show the same tissue at different grey levels on different slices.
"""
from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from oncotransfer.data.readers.base import (ImageReadError, Probe, Reader, check_pixels, one_line, source_name,
                                            split_frame)
from oncotransfer.errors import MissingExtraError

NIFTI_SUFFIXES = frozenset({".nii", ".nii.gz"})
INSTALL_HINT = "pip install 'oncotransfer[nifti]'"
PERCENTILES = (0.5, 99.5)
SAMPLE_VOXELS = 4_000_000
"""The volume-wide window is taken from at most this many voxels (every k-th one): percentiles of 4 M samples
move by well under one grey level, and a 512 x 512 x 600 CT is not held as float64 (1.2 GB)."""
CHUNK_VOXELS = 8_000_000
"""Voxels read per step of the window pass: 64 MB as float64, whatever the volume's size."""
_UNITS_UM = {"mm": 1000.0, "micron": 1.0}
_MPP_RANGE = (0.01, 20_000.0)  # 10 nm (electron microscopy) .. 20 mm (a coarse scan); outside: a broken header


def _nibabel():
    try:
        import nibabel  # lazy: an optional extra, and only NIfTI input needs it
    except ImportError:
        raise MissingExtraError(f"NIfTI input needs nibabel: {INSTALL_HINT}") from None
    return nibabel


def volume_name(path: str | Path) -> str:
    """``.../case_07/t1.nii.gz`` -> ``case_07/t1``: the group that keeps a volume's slices in one fold. The
    folder is part of it because layouts with one folder per case often give every volume the same file name."""
    p = Path(path)
    name = p.name
    for s in (".nii.gz", ".nii"):
        if name.lower().endswith(s):
            name = name[:-len(s)]
            break
    return f"{p.parent.name}/{name}"


def _load(path: str, name: str):
    """(image, spatial shape, frames); ImageReadError for anything nibabel cannot use as an image to slice."""
    nib = _nibabel()
    try:
        img = nib.load(path)
        shape = tuple(int(d) for d in img.header.get_data_shape())
        dtype = img.header.get_data_dtype()
        offset = int(img.header.get_data_offset())
    except nib.filebasedimages.ImageFileError:  # its message repeats the path and says nothing more
        raise ImageReadError(f"{name}: not a NIfTI file, or its header is corrupt or truncated") from None
    except Exception as e:  # noqa: BLE001 - nibabel raises HeaderDataError, OSError, EOFError, zlib errors...
        raise ImageReadError(f"{name}: unreadable NIfTI header ({one_line(e)})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ImageReadError(f"{name}: not a NIfTI-1/2 image ({type(img).__name__})")
    if not 2 <= len(shape) <= 4:
        raise ImageReadError(f"{name}: a {len(shape)}-D NIfTI image; expected 2-D, 3-D or 4-D (shape {shape})")
    if min(shape) < 1:
        raise ImageReadError(f"{name}: the header declares an empty image (shape {shape})")
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise ImageReadError(f"{name}: NIfTI data type {dtype} is not a grey-level image (RGB or complex "
                             "volumes are not supported)")
    if not path.lower().endswith(".gz"):  # uncompressed: a truncated file is told by its size, header only
        need, have = offset + math.prod(shape) * dtype.itemsize, os.path.getsize(path)
        if have < need:
            raise ImageReadError(f"{name}: truncated NIfTI file ({have:,} bytes, its header declares {need:,})")
    return img, shape, (shape[2] if len(shape) >= 3 else 1)


def _mpp(header) -> tuple[float | None, str | None]:
    """In-plane microns per pixel when the units are mm or µm, square and plausible; else (None, why or None)."""
    unit = header.get_xyzt_units()[0]
    zooms = header.get_zooms()
    if unit not in _UNITS_UM or len(zooms) < 2:
        return None, None
    x, y = (float(z) * _UNITS_UM[unit] for z in zooms[:2])
    if not all(math.isfinite(v) and _MPP_RANGE[0] <= v <= _MPP_RANGE[1] for v in (x, y)):
        return None, None
    if abs(x - y) > 0.01 * max(x, y):
        return None, f"anisotropic in-plane voxels ({x:g} x {y:g} µm), shown square"
    return float(f"{x:.6g}"), None  # pixdim is float32: 0.8 mm would read 800.0000119 µm


def _index(shape: tuple, k: int | slice) -> tuple:
    """The ``dataobj`` index of slice(s) ``k`` (a 2-D image: all of it; 4-D: time point 0)."""
    whole = (slice(None), slice(None))
    return whole if len(shape) == 2 else whole + ((k,) if len(shape) == 3 else (k, 0))


def _flips(img) -> tuple[bool, bool]:
    """Whether the two in-plane voxel axes must be reversed for the radiological display (see module doc)."""
    nib = _nibabel()
    try:
        ornt = nib.orientations.io_orientation(img.affine)
    except Exception:  # noqa: BLE001 - a singular affine: show the voxels as stored, RAS assumed
        return True, True
    signs = [1.0 if np.isnan(ornt[i, 1]) else float(ornt[i, 1]) for i in range(2)]
    # RAS slice -> radiological view reverses both axes; an axis already running L or P is reversed once less.
    return signs[0] > 0, signs[1] > 0


def _window(path: str) -> tuple[float, float]:
    """(lo, hi) grey range of the whole volume, the same for each of its slices (cached per file version)."""
    st = os.stat(path)
    out = _cached_window(path, st.st_mtime_ns, st.st_size)
    if isinstance(out, str):
        raise ImageReadError(out)
    return out


@functools.lru_cache(maxsize=512)
def _cached_window(path: str, mtime_ns: int, size: int) -> tuple[float, float] | str:
    """cal_min/cal_max, else robust percentiles of the first time point; a failure is cached as its message so
    a truncated 300-slice volume is read once, not once per slice. ``mtime_ns`` and ``size`` key the cache: a
    rewritten file gets a new window."""
    try:
        img, shape, frames = _load(path, path)
    except ImageReadError as e:
        return str(e)
    cal_lo, cal_hi = (float(img.header["cal_min"]), float(img.header["cal_max"]))
    if math.isfinite(cal_lo) and math.isfinite(cal_hi) and cal_hi > cal_lo:
        return cal_lo, cal_hi
    per_slice = shape[0] * shape[1]
    stride = max(1, math.ceil(per_slice * frames / SAMPLE_VOXELS))
    step = max(1, CHUNK_VOXELS // per_slice)
    samples, offset = [], 0
    try:
        for z in range(0, frames, step):
            chunk = np.asarray(img.dataobj[_index(shape, slice(z, z + step))], dtype=np.float64)
            flat = chunk.reshape(-1, order="F")  # the file's voxel order, so the sample does not depend on step
            samples.append(flat[(-offset) % stride::stride])
            offset += flat.size
    except Exception as e:  # noqa: BLE001 - truncated or corrupt data: the whole volume is unusable
        return f"{path}: unreadable NIfTI voxel data ({one_line(e)})"
    values = np.concatenate(samples)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return f"{path}: the volume holds no finite voxel value (all NaN or infinite)"
    lo, hi = np.percentile(values, PERCENTILES)
    return float(lo), float(hi)


def to_grey8(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Values -> uint8 over [lo, hi] (clipped; NaN as lo); a flat volume (hi <= lo) is black."""
    arr = np.nan_to_num(np.asarray(arr, dtype=np.float64), nan=lo, posinf=hi, neginf=lo)
    if not hi > lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.clip(np.rint((arr - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)


def _file(source: str | Path | bytes) -> tuple[str, str, int | None]:
    """(file, name for messages, frame named by ``file#frame=K``)."""
    if isinstance(source, bytes):
        raise ImageReadError("upload: NIfTI volumes cannot be uploaded; send one slice as PNG, or use "
                             "predict on the .nii/.nii.gz file")
    base, frame = split_frame(source)
    return base, source_name(source), frame


class NiftiReader(Reader):
    """NIfTI-1/2 volumes: each slice along the last spatial axis is a frame, the volume's name its group."""
    name = "nifti"
    suffixes = NIFTI_SUFFIXES
    framed = True
    # claims: the suffix (Reader.claims). A suffix-less file with the n+1 magic is not claimed: nibabel picks
    # the image class from the name, and class folders are scanned by suffix anyway.

    def probe(self, source, max_pixels=None, draft_size=None) -> Probe:
        path, name, _ = _file(source)
        img, shape, frames = _load(path, name)
        w, h = shape[0], shape[1]  # displayed transposed: the stored first axis (x) runs along the columns
        check_pixels(w, h, max_pixels, name, " per slice")
        header = img.header
        mpp, why = _mpp(header)
        notes = [why] if why else []
        if len(shape) == 4 and shape[3] > 1:
            notes.append(f"4-D series of {shape[3]} volumes: only the first is read")
        itemsize = header.get_data_dtype().itemsize
        # one slice raw + float64 + uint8 + RGB; the first decode also reads the volume in chunks for its window
        window = min(w * h * frames, CHUNK_VOXELS) * (itemsize + 8)
        return Probe(self.name, "volume" if frames > 1 else "image", w, h, frames=frames, mode=str(header.get_data_dtype()), mpp=mpp,
                     peak_bytes=w * h * (itemsize + 8 + 1 + 3) + window, group=volume_name(path),
                     notes=tuple(notes))

    def decode(self, source, frame=None, max_pixels=None, draft_size=None, us_region=True) -> Image.Image:
        path, name, tagged = _file(source)
        img, shape, frames = _load(path, name)
        check_pixels(shape[0], shape[1], max_pixels, name, " per slice")
        k = tagged if tagged is not None else (frames // 2 if frame is None else frame)
        if not 0 <= k < frames:
            raise ImageReadError(f"{name}: slice {k} does not exist (the volume has {frames} slices)")
        try:
            lo, hi = _window(path)
            arr = np.asarray(img.dataobj[_index(shape, k)])
        except ImageReadError:
            raise
        except Exception as e:  # noqa: BLE001 - a truncated or corrupt stream fails here in many ways
            raise ImageReadError(f"{name}: unreadable NIfTI voxel data ({one_line(e)})") from None
        flip_x, flip_y = _flips(img)
        arr = arr[::-1 if flip_x else 1, ::-1 if flip_y else 1].T
        grey = to_grey8(arr, lo, hi)
        return Image.fromarray(np.ascontiguousarray(grey), "L").convert("RGB")
