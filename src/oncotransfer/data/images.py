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


class ImageReadError(DataError):
    """One image could not be decoded (unreadable, truncated, a decompression bomb)."""


def _to_rgb(img: Image.Image) -> Image.Image:
    img = ImageOps.exif_transpose(img)
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


def open_rgb(source: str | Path | bytes, draft_size: int | None = None) -> Image.Image:
    """Decode fully to RGB; raise ImageReadError (one line) for unreadable or truncated data."""
    name = "upload" if isinstance(source, bytes) else str(source)
    try:
        with warnings.catch_warnings():
            # A decompression-bomb warning is an error for us: a 20000x20000 PNG must not be decoded.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))  # libjpeg decodes at 1/2..1/8 scale: much faster
            img.load()
            return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(f"{name}: image too large ({e})") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{name}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageReadError(f"{name}: unreadable or truncated image ({str(e)[:80]})") from None


def resize_uint8(img: Image.Image, size: int) -> torch.Tensor:
    """Squash-resize to size x size (whole field of view kept) -> uint8 tensor (3, size, size)."""
    img = img.resize((size, size), Image.BILINEAR, reducing_gap=None)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def decode_for_model(source: str | Path | bytes, size: int) -> tuple[Image.Image, torch.Tensor]:
    """(RGB image, uint8 (3, size, size)): the one decoding rule for training, predict and serve.

    JPEGs are draft-decoded at no less than 256 px: a coarser draft moved probabilities by up to 0.04.
    """
    img = open_rgb(source, draft_size=max(size, 256))
    return img, resize_uint8(img, size)


def load_resized(source: str | Path | bytes, size: int) -> torch.Tensor:
    return decode_for_model(source, size)[1]


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
