"""Checks that need the loaded data or the file system, run before a run directory is made (so a failed check
leaves nothing behind) and before any training."""
from __future__ import annotations

from pathlib import Path

from oncotransfer.config import ExperimentConfig
from oncotransfer.data.keypoints import KEYPOINTS_FILE
from oncotransfer.errors import ConfigError
from oncotransfer.evaluate.metrics import resolve_positive


def _not_a_folder(path: str | Path) -> Path | None:
    """The first existing component of ``path`` that is not a folder (a file where a folder must go)."""
    p = Path(path).expanduser()
    for q in [*reversed(p.parents), p]:
        if q.exists() and not q.is_dir():
            return q
    return None


def check_before_run(cfg: ExperimentConfig, classes: list[str], resume: bool = False) -> None:
    """evaluate.positive_classes against the data's classes; output_dir and train.cache_dir must be folders."""
    resolve_positive(classes, cfg.evaluate.positive_classes)  # its errors, before training instead of after
    checks = [("train.cache_dir", cfg.train.cache_dir)] + ([] if resume else [("output_dir", cfg.output_dir)])
    for key, value in checks:
        if value is None:
            continue
        bad = _not_a_folder(value)
        if bad is not None:
            raise ConfigError(f"{key} {str(value)!r}: {str(bad)!r} is a file, not a folder; point {key} at a "
                              "folder (it is created if missing)")


def remove_unstarted(run_dir: Path) -> None:
    """Remove a new run folder that holds nothing but what is written before training (its config, split and the
    split's overlap keypoints): no epoch was saved."""
    import shutil
    run_dir = Path(run_dir)
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {"config.yaml", "split.csv", KEYPOINTS_FILE}:
        shutil.rmtree(run_dir, ignore_errors=True)
