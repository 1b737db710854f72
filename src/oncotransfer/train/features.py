"""Frozen-backbone feature cache: each image's features once per view, on disk, keyed by all that changes them."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch

from oncotransfer.data.images import normalise
from oncotransfer.errors import MissingExtraError
from oncotransfer.io import atomic_save_tensors, read_tensors
from oncotransfer.runtime import export_onnx, ort_session, run_session
from oncotransfer.train import distributed as D
from oncotransfer.train.device import autocast

log = logging.getLogger("oncotransfer.cache")


def default_cache_dir() -> Path:
    return Path(os.environ.get("ONCOTRANSFER_CACHE", Path.home() / ".cache" / "oncotransfer")) / "features"


@torch.inference_mode()
def extract_features(backbone: torch.nn.Module, images: torch.Tensor, mean: tuple, std: tuple,
                     device: torch.device, fast: bool, batch_size: int = 64,
                     on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """uint8 or [0, 1] images (N, 3, H, W) -> pooled float32 features (N, F). Backbone must be in eval mode.
    ``on_batch(n)`` is told after each batch of ``n`` images (progress)."""
    out = []
    for start in range(0, len(images), batch_size):
        x = normalise(images[start:start + batch_size], mean, std).to(device)
        if fast and device.type in ("cpu", "cuda"):
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, fast):
            out.append(backbone(x).float().cpu())
        if on_batch:
            on_batch(len(x))
    return torch.cat(out) if out else torch.zeros((0, 0))


def resolve_engine(engine: str, device: torch.device) -> str:
    """auto -> onnx on CPU when onnxruntime imports (fp32, 4-7x eager PyTorch on AVX2 CPUs), torch otherwise:
    on a GPU eager PyTorch is fast already and the CPU-only runtime would be slower."""
    if engine != "auto":
        return engine
    if device.type != "cpu":
        return "torch"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "torch"
    return "onnx"


def extract_features_onnx(session, images: torch.Tensor, mean: tuple, std: tuple, batch_size: int = 32,
                          on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
    """Like ``extract_features`` through an ONNX Runtime session of the backbone; normalised per batch."""
    out = []
    for start in range(0, len(images), batch_size):
        x = normalise(images[start:start + batch_size], mean, std)
        out.append(torch.from_numpy(run_session(session, x.numpy(), batch_size)))
        if on_batch:
            on_batch(len(x))
    return torch.cat(out) if out else torch.zeros((0, 0))


def onnx_session(path: Path, module: torch.nn.Module, size: int, device: torch.device, threads: int | None = None):
    """An ONNX Runtime session of ``module`` at ``size`` px, exported to ``path`` once and reused after.
    A cached export that does not load (cut short, damaged) is dropped with a warning and exported again."""
    if path.is_file():
        try:
            return ort_session(path, threads=threads)
        except MissingExtraError:
            raise
        except Exception as e:  # onnxruntime raises its own error types for a damaged model file
            log.warning(f"warning: cached ONNX export {path} does not load ({str(e).splitlines()[0][:120]}); "
                        "dropped and exported again")
            path.unlink(missing_ok=True)
    export_onnx(module.cpu().eval(), path, size)
    module.to(device)
    return ort_session(path, threads=threads)


class FeatureCache:
    """Features per (model key, view key) file, rows addressed by image content hash.

    The model key covers backbone, weights digest, preprocessing and precision; the view key covers the
    augmentation and its per-image seed. A changed image has a new hash, so a stale row is never read.
    """

    def __init__(self, root: str | Path | None, model_key: dict, engine: str = "torch"):
        self.root = Path(root) if root else default_cache_dir()
        self.model_key = cache_digest(model_key)
        self.engine = engine
        self.hits = 0
        self.misses = 0
        self._session = None

    def extract(self, backbone: torch.nn.Module, images: torch.Tensor, mean: tuple, std: tuple,
                device: torch.device, fast: bool, on_batch: Callable[[int], None] | None = None) -> torch.Tensor:
        """``extract_features`` through this cache's engine; the ONNX export is made once per model key."""
        if self.engine != "onnx":
            return extract_features(backbone, images, mean, std, device, fast, on_batch=on_batch)
        if self._session is None:
            # Under torchrun the ranks of one machine share its cores (torchrun sets OMP_NUM_THREADS=1 likewise).
            per_rank = max(1, (os.cpu_count() or 1) // D.world_size()) if D.world_size() > 1 else None
            self._session = onnx_session(self.root / self.model_key / f"backbone_{images.shape[-1]}.onnx",
                                         backbone, int(images.shape[-1]), device, per_rank)
        return extract_features_onnx(self._session, images, mean, std, on_batch=on_batch)

    def _file(self, view_key: dict) -> Path:
        return self.root / self.model_key / f"{cache_digest(view_key)}.safetensors"

    def get(self, view_key: dict, shas: list[str],
            compute: Callable[[list[int]], torch.Tensor]) -> torch.Tensor:
        """Features for ``shas`` in order; ``compute(missing_positions)`` fills what the cache lacks.

        Under torchrun rank 0 reads and writes the cache; every rank takes part in ``compute`` (which shards the
        extraction) and receives the result, so ranks on other machines need no cache of their own."""
        path = self._file(view_key)
        main = D.is_main()
        have: dict[str, torch.Tensor] = {}
        if main and path.is_file():
            have = _read_entry(path, view_key)
        missing = D.broadcast([i for i, s in enumerate(shas) if s not in have] if main else None)
        self.hits += len(shas) - len(missing)
        self.misses += len(missing)
        new = compute(missing) if missing else None
        if not main:
            return D.broadcast(None)
        if new is not None:
            for j, i in enumerate(missing):
                have[shas[i]] = new[j]
            keys = list(have)
            feats = torch.stack([have[k] for k in keys]).contiguous()
            atomic_save_tensors({"features": feats}, path,
                                {"shas": json.dumps(keys), "view": json.dumps(view_key, sort_keys=True),
                                 "sha256": _entry_digest(view_key, keys, feats)})
        return D.broadcast(torch.stack([have[s] for s in shas]))


def _read_entry(path: Path, view_key: dict) -> dict[str, torch.Tensor]:
    """Rows of one cache file by image hash; a file that does not load (cut short by a kill before writes were
    atomic, damaged on disk), of another view, or whose rows disagree with the digest written beside them (rows
    swapped or changed, a file written before entries carried digests) is dropped with a warning and recomputed."""
    try:
        tensors, metadata = read_tensors(path)  # one read: another process may rename a new version over it
        known, feats = json.loads(metadata["shas"]), tensors["features"]
        if not isinstance(known, list) or not all(isinstance(h, str) for h in known):
            raise ValueError("its row hashes are not a list of strings")
        if feats.ndim != 2 or feats.shape[0] != len(known):
            raise ValueError(f"{feats.shape[0]} rows for {len(known)} images")
        if json.loads(metadata.get("view", "null")) != json.loads(json.dumps(view_key, default=str)):
            raise ValueError("it holds another view's features")
        if metadata.get("sha256") != _entry_digest(view_key, known, feats):
            raise ValueError("content differs from the digest written with it")
    except Exception as e:  # safetensors raises its own error types for a damaged file
        log.warning(f"warning: feature cache entry {path} is damaged ({str(e).splitlines()[0][:120]}); "
                    "dropped, its features are recomputed")
        path.unlink(missing_ok=True)
        return {}
    return {s: feats[i] for i, s in enumerate(known)}


def _entry_digest(view_key: dict, shas: list[str], feats: torch.Tensor) -> str:
    """What an entry was computed from and holds: view key, row hashes in order, and the feature bytes."""
    h = hashlib.sha256(json.dumps({"view": view_key, "shas": shas}, sort_keys=True, default=str).encode())
    h.update(str(feats.dtype).encode() + str(tuple(feats.shape)).encode())
    h.update(feats.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def cache_digest(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:20]
