"""Cached activations at a cut inside a backbone, so only the tail (and head) trains each epoch.

When the frozen part of a backbone is a prefix (``freeze: last:N`` or ``from:STAGE``), its output for an image
never changes during training. It is computed once per image and per offline augmented view, stored as fp16
``.npy`` files (memory-mapped) keyed like the feature cache plus the cut point, and the tail trains on it.
A data set whose activations exceed ``train.cache_memory_mb`` is read batch by batch from disk instead of
being loaded, so memory stays bounded.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from oncotransfer.data.images import normalise
from oncotransfer.io import atomic_write_bytes
from oncotransfer.runtime import run_session
from oncotransfer.train.features import cache_digest, default_cache_dir, onnx_session

log = logging.getLogger("oncotransfer.cache")


@torch.inference_mode()
def extract_activations(prefix: torch.nn.Module, images: torch.Tensor, mean: tuple, std: tuple,
                        device: torch.device, fast: bool, batch_size: int = 64,
                        on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """uint8 images (N, 3, H, W) -> fp16 prefix outputs (N, C, h, w), with PyTorch. ``prefix`` in eval mode."""
    out = []
    for start in range(0, len(images), batch_size):
        x = normalise(images[start:start + batch_size], mean, std).to(device)
        if fast and device.type in ("cpu", "cuda"):
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(prefix(x).float().cpu().contiguous().numpy().astype(np.float16))
        if on_batch:
            on_batch(len(x))
    return np.concatenate(out) if out else np.zeros((0,), np.float16)


def extract_activations_onnx(session, images: torch.Tensor, mean: tuple, std: tuple, batch_size: int = 32,
                             on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    out = []
    for start in range(0, len(images), batch_size):
        x = normalise(images[start:start + batch_size], mean, std).numpy()
        out.append(run_session(session, x, batch_size).astype(np.float16))
        if on_batch:
            on_batch(len(x))
    return np.concatenate(out) if out else np.zeros((0,), np.float16)


class ActivationCache:
    """One fp16 ``.npy`` per (model key + cut, view key), rows addressed by image content hash.

    ``<view>.json`` names the ``.npy`` that holds its rows; a new version of the rows gets a new file name and
    the JSON is replaced last, so a reader never pairs an index with a half-written array. The index also holds
    the view key and a digest of (view key, row hashes, the ``.npy`` file's bytes): rows swapped in the index,
    arrays zeroed or exchanged between views are dropped with a warning and recomputed, never used. The file
    name in an index is never trusted as a path: only ``<view>.<rows>.<pid>.npy`` beside it is read or removed.
    """

    def __init__(self, root: str | Path | None, model_key: dict, engine: str = "torch"):
        self.root = Path(root) if root else default_cache_dir()
        self.key = cache_digest({**model_key, "kind": "activations-fp16"})
        self.engine = engine
        self.hits = 0
        self.misses = 0
        self._session = None

    def extract(self, prefix: torch.nn.Module, images: torch.Tensor, mean: tuple, std: tuple,
                device: torch.device, fast: bool, on_batch: Callable[[int], None] | None = None) -> np.ndarray:
        if self.engine != "onnx":
            return extract_activations(prefix, images, mean, std, device, fast, on_batch=on_batch)
        if self._session is None:
            self._session = onnx_session(self.root / self.key / f"prefix_{images.shape[-1]}.onnx", prefix,
                                         int(images.shape[-1]), device)
        return extract_activations_onnx(self._session, images, mean, std, on_batch=on_batch)

    def _index_file(self, view_key: dict) -> Path:
        return self.root / self.key / f"{cache_digest(view_key)}.json"

    def _read(self, view_key: dict) -> tuple[list[str], np.ndarray | None]:
        index = self._index_file(view_key)
        if not index.is_file():
            return [], None
        try:
            info = json.loads(index.read_text())
            path = _entry_file(index, info)
            shas = info["shas"]
            if not isinstance(shas, list) or not all(isinstance(h, str) for h in shas):
                raise ValueError("the index's row hashes are not a list of strings")
            if json.dumps(info.get("view"), sort_keys=True) != json.dumps(view_key, sort_keys=True):
                raise ValueError("the index belongs to another view")
            if info.get("sha256") != _entry_digest(view_key, shas, path):
                raise ValueError("content differs from the digest in its index (rows swapped, arrays changed "
                                 "or exchanged, or written before entries carried digests)")
            arr = np.load(path, mmap_mode="r")
            if arr.dtype != np.float16 or arr.ndim < 2 or arr.shape[0] != len(shas):
                raise ValueError(f"array {arr.dtype} {tuple(arr.shape)} does not fit the index's {len(shas)} rows")
        except FileNotFoundError:
            return [], None  # another process replaced the entry between our reads: computed again
        except (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError) as e:  # EOF: empty file
            # A damaged entry is recomputed, not trusted; its new file replaces the index.
            log.warning(f"warning: activation cache entry {index} is damaged ({str(e).splitlines()[0][:120]}); "
                        "dropped, its activations are recomputed")
            return [], None
        return shas, arr

    def get(self, view_key: dict, shas: list[str], compute: Callable[[list[int]], np.ndarray],
            chunk: int = 256, on_missing: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(memory-mapped array of rows, row of each of ``shas``). Missing rows are computed ``chunk`` images at
        a time straight into the new file, so extraction memory does not grow with the data set.
        ``on_missing(n)`` hears how many rows are to be computed, before the first chunk."""
        known, arr = self._read(view_key)
        row = {s: i for i, s in enumerate(known)}
        missing = [i for i, s in enumerate(shas) if s not in row]
        self.hits += len(shas) - len(missing)
        self.misses += len(missing)
        if missing:
            if on_missing:
                on_missing(len(missing))
            arr = self._write(view_key, known, arr, [shas[i] for i in missing],
                              (compute(missing[s:s + chunk]) for s in range(0, len(missing), chunk)))
            known = known + [shas[i] for i in missing]
            row = {s: i for i, s in enumerate(known)}
        return arr, np.array([row[s] for s in shas], dtype=np.int64)

    def _write(self, view_key: dict, known: list[str], old_arr: np.ndarray | None, added: list[str],
               chunks) -> np.ndarray:
        index = self._index_file(view_key)
        index.parent.mkdir(parents=True, exist_ok=True)
        old = None
        if index.is_file():
            try:
                old = _entry_file(index, json.loads(index.read_text()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                old = None  # a damaged index names no file we may remove
        first = next(chunks)
        n_old = 0 if old_arr is None else len(old_arr)
        shape = (n_old + len(added), *first.shape[1:])
        fd, tmp = tempfile.mkstemp(dir=index.parent, prefix=f".{index.stem}.", suffix=".npy")
        os.close(fd)
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
            # Reserve the blocks now: writing a memory map on a full disk kills the process (SIGBUS) instead of
            # raising, so a full disk must fail here, as an OSError naming the file.
            if hasattr(os, "posix_fallocate"):
                with open(tmp, "r+b") as f:
                    os.posix_fallocate(f.fileno(), 0, os.path.getsize(tmp))
            for s in range(0, n_old, 4096):
                out[s:min(s + 4096, n_old)] = old_arr[s:s + 4096]
            at = n_old
            for part in (first, *chunks):
                out[at:at + len(part)] = part
                at += len(part)
            out.flush()
            del out
            name = f"{index.stem}.{shape[0]}.{os.getpid()}.npy"
            os.replace(tmp, index.parent / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        shas = known + added
        atomic_write_bytes(index, json.dumps({"file": name, "shas": shas, "view": view_key, "shape": list(shape),
                                              "sha256": _entry_digest(view_key, shas, index.parent / name)}).encode())
        if old is not None and old.name != name:
            old.unlink(missing_ok=True)
        return np.load(index.parent / name, mmap_mode="r")


def _entry_file(index: Path, info: dict) -> Path:
    """The ``.npy`` an index names, only if it is this index's own file beside it (``<stem>.<rows>.<pid>.npy``):
    a name that climbs out of the cache (``../../x``) or points elsewhere is a damaged index, never a path."""
    name = info["file"]
    if not isinstance(name, str) or not re.fullmatch(re.escape(index.stem) + r"\.[0-9]+\.[0-9]+\.npy", name):
        raise ValueError(f"index names {str(name)[:60]!r}, not a file of this cache entry")
    return index.parent / name


def _entry_digest(view_key: dict, shas: list[str], path: Path) -> str:
    """What an entry was computed from and holds: view key, row hashes in order, and the array file's bytes."""
    h = hashlib.sha256(json.dumps({"view": view_key, "shas": shas}, sort_keys=True, default=str).encode())
    with open(path, "rb") as f:  # read, not memory-mapped: hashing must not make the whole array resident
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ActivationBank:
    """Rows of several views (view 0 = original, 1..K = augmented copies), gathered per batch as float32.

    In memory (fp16) when all views fit ``budget_bytes``; otherwise every batch is read from the memory-mapped
    files, so a large data set streams from disk instead of failing."""

    def __init__(self, views: list[tuple[np.ndarray, np.ndarray]], budget_bytes: int):
        need = sum(len(rows) * int(np.prod(arr.shape[1:])) * 2 for arr, rows in views)
        self.streaming = need > budget_bytes
        if self.streaming:
            self._views = views
        else:
            self._views = [(np.ascontiguousarray(arr[np.sort(np.unique(rows))]), _reindex(rows)) for arr, rows in views]
        self.nbytes = need

    def gather(self, view: np.ndarray, pos: np.ndarray) -> torch.Tensor:
        """Rows for (view, position-in-data-set) pairs, in the order given."""
        first = self._views[0][0]
        out = np.empty((len(pos), *first.shape[1:]), dtype=np.float16)
        for v in np.unique(view):
            sel = np.nonzero(view == v)[0]
            arr, rows = self._views[int(v)]
            want = rows[pos[sel]]
            order = np.argsort(want, kind="stable")  # sorted reads are kinder to a memory-mapped file
            out[sel[order]] = arr[want[order]]
        return torch.from_numpy(out).float()


def _reindex(rows: np.ndarray) -> np.ndarray:
    """Rows into a compacted copy that holds only ``np.unique(rows)``, in sorted order."""
    uniq = np.sort(np.unique(rows))
    return np.searchsorted(uniq, rows)
