"""The run's ONNX export as a cache for scoring: exported on first use, exported again when stale, shared safely
by processes that start at once. Imports no PyTorch (``predict --slide`` streams without it) until it exports.

The ensemble of a run's fold models lives in ``RUN/export/`` (where ``oncotransfer export`` writes it), fold K
alone in ``RUN/export/foldK/``, so ``--fold K`` never overwrites the ensemble's export.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

from oncotransfer.errors import CheckpointError
from oncotransfer.io import sha256_file, write_json
from oncotransfer.rundir import read_export_info

ONNX_NAME = "model.onnx"


def export_folder(run_dir: Path, fold: int | None = None) -> Path:
    """Where the export of the ensemble (``fold=None``) or of fold ``fold`` alone is cached."""
    return run_dir / "export" if fold is None else run_dir / "export" / f"fold{fold}"


def export_problem(run_dir: Path, folder: Path, classes: list[str], members: list[dict],
                   ood_digest: str | None) -> str | None:
    """Why ``folder``'s ONNX export cannot answer for these members and detector (missing, damaged, of other
    weights or folds, without the detector), or None when it can."""
    try:
        info = read_export_info(run_dir, folder.relative_to(run_dir))
    except CheckpointError:
        return "its model.json is damaged"
    if info is None:
        return "not exported yet"
    path = folder / info.file
    if info.format != "onnx" or not path.is_file():
        return f"{folder.name}/ holds no ONNX model"
    # what model.json says first, the files' digests after: `predict --fold K` asks the ensemble's folder
    # first, and hashing its model (5 members) only to learn it holds other folds cost a tenth of a second
    held = None if info.members is None else [_member(m) for m in info.members]
    if held is not None and held != members:
        folds = [m["fold"] for m in held], [m["fold"] for m in members]
        return (f"it holds fold model(s) {folds[0]}, not {folds[1]}" if folds[0] != folds[1]
                else "its temperatures are not the run's")
    ood = info.ood if isinstance(info.ood, dict) else {}
    if ood.get("tensors_sha256") != ood_digest:
        return "it was written without the run's out-of-distribution detector (or with another one)"
    if info.sha256 is not None and sha256_file(path) != info.sha256:
        return f"{info.file} differs from the digest model.json records (damaged)"
    if info.classes != classes or info.checkpoint_digest not in (None, sha256_file(run_dir / "checkpoint" /
                                                                                   "model.safetensors")):
        return "the checkpoint changed since it was exported"
    # meta.json holds every fold file's digest: a fold retrained in place changes it (model.safetensors does not)
    source = info.content().get("source") or {}
    if source.get("model_sha256") == info.sha256 and source.get("meta_sha256") not in (None, _meta_digest(run_dir)):
        return "the fold models changed since it was exported"
    return None


def run_members(run_dir: Path, meta: dict) -> list[dict]:
    """The members ``Predictor.from_run`` scores (fold, temperature, and recipe in an ensemble of recipes), read
    from meta.json files without PyTorch; the digests are checked when the models are loaded to export them."""
    from oncotransfer.rundir import read_checkpoint_meta
    out = []
    metas = [meta] + [read_checkpoint_meta(Path(run_dir) / "checkpoint" / r["dir"]).content()
                      for r in meta.get("recipes") or []]
    for r, m in enumerate(metas):
        folds = m.get("folds") or [{"fold": int(m.get("fold") or 0), "temperature": m.get("temperature")}]
        out += [{"fold": int(f["fold"]), "temperature": f.get("temperature"), **({"recipe": r} if r else {})}
                for f in folds]
    return out


def _member(m) -> dict:
    """A member as ``Predictor.members`` lists it: fold, temperature and, in an ensemble of recipes, recipe."""
    recipe = (m.model_extra or {}).get("recipe")
    return {"fold": m.fold, "temperature": m.temperature, **({"recipe": recipe} if recipe else {})}


def ensure_export(run_dir: Path, fold: int | None, classes: list[str], members: list[dict], ood_digest: str | None,
                  log: Callable[[str], None] | None = None, folder: Path | None = None,
                  export: Callable[[Path], object] | None = None) -> Path:
    """The folder of a current ONNX export of ``members``, exported now (parity checked, as ``oncotransfer
    export``) when missing or stale. ``folder``/``export``: another graph of the same models, written by
    ``export(folder)`` (model.onnx + a model.json as export's). Raises ``OSError`` when the run directory cannot
    be written, ``OncoError`` or the exporter's own error when the model does not export."""
    if folder is None and fold is not None and export_problem(run_dir, export_folder(run_dir), classes, members,
                                                              ood_digest) is None:
        return export_folder(run_dir)  # `oncotransfer export --fold K` wrote fold K alone where the ensemble goes
    folder = folder or export_folder(run_dir, fold)
    if export_problem(run_dir, folder, classes, members, ood_digest) is None:
        return folder  # nothing to write: a read-only run directory with a current export is fine
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder / ".export.lock"):
        # another process may have exported while this one waited for the lock
        why = export_problem(run_dir, folder, classes, members, ood_digest)
        if why is None:
            return folder
        from oncotransfer.infer.export import export_run
        what = f"fold {fold}'s model" if fold is not None else (
            f"the {len(members)} fold models" if len(members) > 1 else "the model")
        if log is not None:
            log(f"exporting {what} to {folder / ONNX_NAME} for ONNX Runtime ({why})")
        if export is None:
            export_run(run_dir, "onnx", fold=fold, out_dir=folder)
        else:
            export(folder)
        info = read_export_info(run_dir, folder.relative_to(run_dir))
        write_json(folder / "model.json", {**info.content(), "source": {
            "model_sha256": info.sha256, "meta_sha256": _meta_digest(run_dir),
            "meaning": "checkpoint/meta.json (every fold file's digest) when model_sha256 was exported"}})
    return folder


def _meta_digest(run_dir: Path) -> str:
    return sha256_file(run_dir / "checkpoint" / "meta.json")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (the file stays; the lock goes with its descriptor, even on kill -9).
    Each file of the export is also written to a temp name and renamed, so readers never see half a file."""
    try:
        import fcntl
    except ImportError:  # not POSIX: files are still replaced atomically, one at a time
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def checkpoint_digest(run_dir: Path) -> str:
    return sha256_file(Path(run_dir) / "checkpoint" / "model.safetensors")
