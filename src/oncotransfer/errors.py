"""User-facing errors: each carries one line that says what was wrong, where, and how to fix it."""
import errno
from pathlib import Path


class OncoError(Exception):
    """Base for errors the CLI prints as one line (no traceback)."""


class ConfigError(OncoError):
    """A config key or value is wrong."""


class DataError(OncoError):
    """Input images, folders or manifests are unusable."""


class LeakageError(OncoError):
    """A patient or identical image would sit on both sides of a split."""


class WeightsError(OncoError):
    """Pretrained or checkpoint weights cannot be had or do not fit."""


class CheckpointError(OncoError):
    """A run directory or checkpoint is missing or does not match."""


class MissingExtraError(OncoError):
    """An optional dependency is not installed."""


class RunLayoutError(CheckpointError):
    """A run directory was written by a newer oncotransfer, in a layout this version cannot read."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C once a run directory exists: carries that directory, so the CLI can name what ``--resume``
    continues. Still a KeyboardInterrupt, so every handler of Ctrl-C treats it as one."""

    def __init__(self, run_dir: str | Path):
        super().__init__(str(run_dir))  # in args too: a worker process's copy unpickles with it
        self.run_dir = Path(run_dir)


_OS_HINTS = {
    "ENOSPC": "the disk is full: free some space, or point output_dir / train.cache_dir (ONCOTRANSFER_CACHE) "
              "at a disk with room, then run again (train --resume RUN_DIR continues a run)",
    "EDQUOT": "the disk quota is used up: free some space or write elsewhere, then run again",
    "EROFS": "the file system is read-only: choose a writable output_dir / train.cache_dir (ONCOTRANSFER_CACHE)",
    "EACCES": "permission denied: choose a folder you may write to (output_dir, train.cache_dir, "
              "ONCOTRANSFER_CACHE) or fix its permissions",
    "EPERM": "operation not permitted: choose a folder you may write to (output_dir, train.cache_dir)",
    "ENAMETOOLONG": "a name in that path is longer than the file system allows (255 bytes): shorten the path "
                    "(output_dir, train.cache_dir, data.path) or the run's name",
    "ELOOP": "the path goes through a symbolic link loop: give a real folder (output_dir, train.cache_dir, "
             "data.path)",
    "ENOENT": "a folder on that path does not exist and cannot be made there (e.g. under /proc or /sys): give a "
              "folder you may create (output_dir, train.cache_dir)",
    "ENOTDIR": "a file stands where a folder is needed: give a folder path (output_dir, train.cache_dir, "
               "ONCOTRANSFER_CACHE) or move that file away",
    "EEXIST": "a file stands where a folder is needed: give a folder path or move that file away",
    "EISDIR": "a folder stands where a file is needed: give a file path",
}


def os_error_line(e: OSError) -> str | None:
    """One line for a storage error the user can fix (full disk, read-only or forbidden folder, a file where a
    folder should be), naming the path and what to do; None for other OS errors."""
    name = errno.errorcode.get(e.errno or 0, "")
    if name not in _OS_HINTS:
        return None
    where = e.filename or "a file"
    verb = "cannot use" if name in ("ENAMETOOLONG", "ELOOP", "ENOENT") else "cannot write"
    return f"{verb} {where}: {e.strerror or name}; {_OS_HINTS[name]}"
