"""Leaf module: atomic file writes and the one file-hash helper (nothing here imports the package).

Every file a run directory, a cache or an export holds is written to a temp file beside it and renamed over
it, so a reader (or a later resume, or a grid counting finished runs) sees the whole file or none: a kill -9
or a full disk leaves the old file or nothing, never a cut-short one. A failed write removes its temp file."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:
    import torch


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temp path beside ``path`` for a writer that needs a file name (``to_csv``, ``savefig``,
    ``np.save``); renamed over ``path`` when the block ends without an error, removed otherwise."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix or path.suffix)
        os.close(fd)
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None or (tmp and str(e.filename) == tmp) or str(e.filename).startswith(
                str(path.parent / f".{path.name}.")):
            e.filename = str(path)  # name the file the user knows, not our temp file
        raise
    finally:
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, then rename it over ``path``: readers see all or nothing."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_to_csv(frame, path: Path, **kwargs: Any) -> None:
    """``frame.to_csv(path, **kwargs)`` through a temp file (pandas writes in chunks: a kill could cut it)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, **kwargs)


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    # Serialised in memory, then written by Python: a full disk is an OSError naming the file (the Rust
    # writer of safetensors.save_file raises its own error type, which the CLI could not name).
    # Imported here: torch takes 1-10 s to import on our CI box, and config (which writes YAML through this
    # module) must stay light for commands that never touch a tensor.
    from safetensors.torch import save as tensors_to_bytes
    atomic_write_bytes(path, tensors_to_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                                              metadata=metadata))


def read_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, read in one go. ``safe_open`` / ``load_file`` reopen the file
    by name for each tensor (a zero-copy map): when another process renames a new version over it between
    those opens, the header of one version is applied to the data of the other and the values are garbage
    (measured: two processes sharing a feature cache). One read of one open file cannot mix versions."""
    from safetensors.torch import load as tensors_from_bytes
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise ValueError(f"{len(data)} bytes: too short for a safetensors file")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("header longer than the file (cut short)")
    metadata = json.loads(data[8:8 + n]).get("__metadata__") or {}
    return tensors_from_bytes(data), metadata


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, default=str).encode())


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
