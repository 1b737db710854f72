"""ONNX Runtime sessions of a run's exports for scoring (``predict``, ``evaluate --data``, ``serve``): each file
checked against its model.json digest before it loads. Kept apart from ``export_cache``, which imports no
PyTorch (``predict --slide``), because the session options live in ``runtime``."""
from __future__ import annotations

from pathlib import Path

from oncotransfer.errors import CheckpointError
from oncotransfer.rundir import export_fix, read_export_info, verified_bytes


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def open_session(run_dir: Path, path: Path):
    """An ONNX Runtime session of the export, its file checked against model.json's digest first; a damaged
    file is one line naming it."""
    from oncotransfer.errors import MissingExtraError
    from oncotransfer.runtime import ort_session
    folder = path.parent.relative_to(run_dir)
    info = read_export_info(run_dir, folder)
    verified_bytes(path, info, f"{folder.as_posix()}/model.json", export_fix(run_dir))
    try:
        return ort_session(path, spin=False)  # predict's reader threads decode between batches
    except MissingExtraError:
        raise
    except Exception as e:  # onnxruntime raises its own error types for a damaged model
        raise CheckpointError(f"{path}: does not load ({str(e).splitlines()[0][:100]}); the file is damaged: "
                              f"{export_fix(run_dir)}") from None
