"""The one place that decodes images: any mode -> RGB with EXIF orientation, resized once."""
from __future__ import annotations

import io
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from oncotransfer.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
# The one refusal threshold (ingestion, `predict`, `serve`), so whatever a model trained on it can also score:
# 64 megapixels (8000 x 8000) holds every camera and microscope tile we know of, and the decode of a 64 MP PNG
# or TIFF peaks near 6 bytes a pixel (native decode + RGB copy) = 384 MB. Pillow's own bomb limit (89 MP
# warning, 179 MP error) lets a 79 KB PNG of 9000 x 9000 px through at about 0.45 GB a request.
MAX_PIXELS = 64_000_000


class ImageReadError(DataError):
    """One image could not be decoded (unreadable, truncated, a decompression bomb)."""


class ImageTooLargeError(ImageReadError):
    """The header declares more pixels than allowed: refused before any pixel is decoded."""


def _bpp(mode: str) -> int:
    """Bytes a decoded pixel takes in Pillow ``mode`` (16-bit and float modes count their float32 stretch)."""
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return 4 + 4 + 1  # native, float32 stretch, 8-bit result
    try:
        bands = Image.getmodebands(mode)
    except (KeyError, ValueError):
        bands = 4
    return bands + (8 if mode in ("RGBA", "LA", "PA", "La", "RGBa") else 0)  # alpha: RGBA copy + composite


def probe_image(source: str | Path | bytes, draft_size: int | None = None,
                max_pixels: int | None = MAX_PIXELS) -> tuple[int, int, int]:
    """(width, height, estimated peak decoded bytes) from the header alone (Pillow opens lazily).

    Raises ImageTooLargeError when width x height exceeds ``max_pixels`` and ImageReadError for data Pillow
    cannot identify. With ``draft_size`` a JPEG counts at the 1/2..1/8 scale libjpeg will decode it at.
    """
    if _is_dicom(source):
        from oncotransfer.data.dicom import probe_dicom
        return probe_dicom(source, max_pixels)
    img = _open_checked(source, max_pixels)
    with img:
        w, h = img.size
        if draft_size and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        dw, dh = img.size
        return w, h, dw * dh * (_bpp(img.mode) + 3)  # the native decode plus its RGB conversion


def _name(source) -> str:
    return "upload" if isinstance(source, bytes) else str(source)


def _open_checked(source: str | Path | bytes, max_pixels: int | None) -> Image.Image:
    """Image.open (header only, no decoding) with the pixel limit applied; errors as ImageReadError."""
    name = _name(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(f"{name}: image too large ({e})") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{name}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{name}: unreadable or truncated image ({str(e)[:80]})") from None
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        img.close()
        raise ImageTooLargeError(f"{name}: image too large ({w} x {h} = {w * h / 1e6:.1f} megapixels; the "
                                 f"limit is {max_pixels / 1e6:g}), refused before decoding")
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    # In place: the freshly decoded image is ours, and a copy would add a full-size frame to the peak.
    ImageOps.exif_transpose(img, in_place=True)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float images: stretch the used range to 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
        img = Image.fromarray(arr.astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return img.convert("RGB")


def _is_dicom(source: str | Path | bytes) -> bool:
    # lazy: data/dicom.py imports this module (its errors and suffixes)
    from oncotransfer.data.dicom import is_dicom_bytes, is_dicom_path
    return is_dicom_bytes(source) if isinstance(source, bytes) else is_dicom_path(source)


def open_rgb(source: str | Path | bytes, draft_size: int | None = None, max_pixels: int | None = None,
             dicom_frame: int | None = None) -> Image.Image:
    """Decode fully to RGB; raise ImageReadError (one line) for unreadable or truncated data.

    A header declaring more than ``max_pixels`` (None: Pillow's bomb limit only, 89 MP) raises
    ImageTooLargeError before decoding; so does Pillow's decompression-bomb warning. DICOM (a DICOM suffix,
    ``file#frame=K``, or the DICM magic on a name without an image suffix, or in uploaded bytes) is decoded by
    data/dicom.py: frame K, else ``dicom_frame``, else the middle one."""
    if _is_dicom(source):
        from oncotransfer.data.dicom import open_dicom
        return open_dicom(source, dicom_frame, max_pixels)
    name = _name(source)
    img = _open_checked(source, max_pixels)
    try:
        with warnings.catch_warnings():
            # A decompression-bomb warning is an error for us: a 20000x20000 PNG must not be decoded.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))  # libjpeg decodes at 1/2..1/8 scale: much faster
            img.load()
            return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(f"{name}: image too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{name}: unreadable or truncated image ({str(e)[:80]})") from None


def resize_uint8(img: Image.Image, size: int) -> torch.Tensor:
    """Squash-resize to size x size (whole field of view kept) -> uint8 tensor (3, size, size)."""
    img = img.resize((size, size), Image.BILINEAR, reducing_gap=None)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def draft_size_for(size: int) -> int:
    """JPEGs are draft-decoded at no less than 256 px: a coarser draft moved probabilities by up to 0.04."""
    return max(size, 256)


def decode_for_model(source: str | Path | bytes, size: int, max_pixels: int | None = None,
                     dicom_frame: int | None = None) -> tuple[Image.Image, torch.Tensor]:
    """(RGB image, uint8 (3, size, size)): the one decoding rule for training, predict and serve
    (``max_pixels`` and ``dicom_frame`` as in ``open_rgb``)."""
    img = open_rgb(source, draft_size=draft_size_for(size), max_pixels=max_pixels, dicom_frame=dicom_frame)
    return img, resize_uint8(img, size)


def phash64(img: Image.Image) -> int:
    """64-bit perceptual hash (imagehash.phash) as an int."""
    import imagehash
    return int(str(imagehash.phash(img)), 16)


def decode_many(paths: list[str], size: int, workers: int = 2, phash: bool = False, max_pixels: int | None = -1
                ) -> tuple[torch.Tensor, list[int], dict[int, str], np.ndarray | None]:
    """Decode and resize every image once, in parallel threads (Pillow releases the GIL).

    Returns (uint8 tensor (M, 3, size, size) of the readable ones, their indices, {index: error}, and the
    readable images' perceptual hashes as uint64 when ``phash``). A file that is not a regular file or whose
    header declares more than ``max_pixels`` (-1: the ingestion limit, ``data.safety``) is refused undecoded.
    """
    from oncotransfer.data.safety import decode_failure, ingest_max_pixels, probe
    limit = ingest_max_pixels() if max_pixels == -1 else max_pixels

    def one(i: int):
        try:
            probe(paths[i], limit)
            img, t = decode_for_model(paths[i], size)
            return i, t, (phash64(img) if phash else 0), None
        except ImageReadError as e:
            return i, None, 0, str(e)
        except Exception as e:  # noqa: BLE001 - hostile bytes can break a decoder plugin in any way
            return i, None, 0, decode_failure(str(paths[i]), e)
    ok, tensors, hashes, failed = [], [], [], {}
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for i, t, h, err in pool.map(one, range(len(paths))):
            if err is not None:
                failed[i] = err
            else:
                ok.append(i)
                tensors.append(t)
                hashes.append(h)
    stack = torch.stack(tensors) if tensors else torch.zeros((0, 3, size, size), dtype=torch.uint8)
    return stack, ok, failed, (np.array(hashes, dtype=np.uint64) if phash else None)


def normalise(images: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 or [0, 1] float (N, 3, H, W) -> normalised float32 with the weights' own mean and std."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s
