"""Decoded images as model input: every file through its reader (``data.readers``), resized once, as tensors."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from oncotransfer.data.readers import ImageReadError, decode_failure, ingest_max_pixels, open_rgb, probe
from oncotransfer.errors import MissingExtraError


def resize_uint8(img: Image.Image, size: int) -> torch.Tensor:
    """Squash-resize an RGB or ``L`` image to size x size (whole field of view kept) -> uint8 tensor
    (3, size, size); an ``L`` image gives three equal bands, exactly its RGB conversion's."""
    img = img.resize((size, size), Image.BILINEAR, reducing_gap=None)
    a = np.asarray(img, dtype=np.uint8)
    if a.ndim == 2:  # Pillow resamples each band alike, so resizing one band and repeating it is exact
        return torch.from_numpy(np.repeat(a[None], 3, axis=0))
    return torch.from_numpy(a.copy()).permute(2, 0, 1)


def draft_size_for(size: int) -> int:
    """JPEGs are draft-decoded at no less than 256 px: a coarser draft moved probabilities by up to 0.04."""
    return max(size, 256)


def decode_for_model(source: str | Path | bytes, size: int, max_pixels: int | None = None,
                     frame: int | None = None, us_region: bool = True) -> tuple[Image.Image, torch.Tensor]:
    """(RGB image, uint8 (3, size, size)): the one decoding rule for training, predict and serve
    (``max_pixels``, ``frame`` and ``us_region`` as in ``data.readers.open_rgb``)."""
    img = open_rgb(source, draft_size=draft_size_for(size), max_pixels=max_pixels, frame=frame, us_region=us_region)
    return img, resize_uint8(img, size)


def decode_tensor(source: str | Path | bytes, size: int, max_pixels: int | None = None, frame: int | None = None,
                  us_region: bool = True) -> tuple[Image.Image, torch.Tensor]:
    """``decode_for_model`` where the caller needs no RGB image: a grey source is decoded and resized as one
    band (the same tensor, about half the work). Returns (the decoded image, RGB or ``L``; the tensor)."""
    img = open_rgb(source, draft_size=draft_size_for(size), max_pixels=max_pixels, frame=frame, us_region=us_region,
                   grey=True)
    return img, resize_uint8(img, size)


def phash64(img: Image.Image) -> int:
    """64-bit perceptual hash (imagehash.phash) as an int."""
    import imagehash
    return int(str(imagehash.phash(img)), 16)


def decode_many(paths: list[str], size: int, workers: int = 2, phash: bool = False, max_pixels: int | None = -1,
                us_region: bool = True) -> tuple[torch.Tensor, list[int], dict[int, str], np.ndarray | None]:
    """Decode and resize every image once, in parallel threads (Pillow releases the GIL).

    Returns (uint8 tensor (M, 3, size, size) of the readable ones, their indices, {index: error}, and the
    readable images' perceptual hashes as uint64 when ``phash``). A file that is not a regular file or whose
    header declares more than ``max_pixels`` (-1: the ingestion limit, ``data.readers.ingest_max_pixels``) is refused undecoded.
    ``us_region``: ultrasound objects are cut to their declared image region (``data.us_region: auto``).
    """
    limit = ingest_max_pixels() if max_pixels == -1 else max_pixels

    def one(i: int):
        try:
            probe(paths[i], limit)
            img, t = decode_tensor(paths[i], size, us_region=us_region)  # phash reads grey anyway
            return i, t, (phash64(img) if phash else 0), None
        except ImageReadError as e:
            return i, None, 0, str(e)
        except MissingExtraError:
            raise  # the format's library is not installed: one line for the command, not one per file
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
    if images.dtype == torch.uint8 and images.device.type == "cpu":
        # numpy, in place: one copy instead of four, and no torch thread pool spinning on the cores the
        # scoring engine runs on (predict normalises in its reader thread); the same float32 operations
        x = images.numpy().astype(np.float32)
        x /= np.float32(255)
        x -= np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
        x /= np.asarray(std, np.float32).reshape(1, 3, 1, 1)
        return torch.from_numpy(x)
    x = images.float()
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s
