"""Folders or CSV -> Manifest (path, label, patient, sha256); duplicate detection by bytes and perceptual hash."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from oncotransfer.data.checks import check_csv, check_listed_files, empty_class_note, scan_class_folder
from oncotransfer.data.frames import expand_rows, framed_reader
from oncotransfer.data.groups import UnionFind
from oncotransfer.data.readers import is_readable_name, regular_file_problem
from oncotransfer.data.readers.base import file_too_large
from oncotransfer.data.readers.pillow import is_image_name
from oncotransfer.data.safe_regex import search_all
from oncotransfer.errors import DataError
from oncotransfer.io import read_csv, sha256_file
from oncotransfer.limits import MAX_TABLE_BYTES


@dataclass
class Manifest:
    """Images with their class, patient (or None) and content hash. Rows are aligned arrays."""
    root: Path
    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    patients: np.ndarray | None
    sha256: list[str]
    skipped: dict[str, str] = field(default_factory=dict)
    """path -> reason for files left out (unreadable, truncated)."""
    notes: list[str] = field(default_factory=list)
    """Warnings found while listing the data (an empty class folder, a symlinked folder not followed)."""
    ungrouped: list[str] = field(default_factory=list)
    """Multi-frame files whose header names no patient (DICOM without PatientID), when nothing else gave
    patients: the reason the data set has no patient ids although its objects could have had them."""

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, idx: np.ndarray | list[int]) -> "Manifest":
        idx = np.asarray(idx, dtype=int)
        return Manifest(self.root, [self.paths[i] for i in idx], self.labels[idx], self.classes,
                        None if self.patients is None else self.patients[idx],
                        [self.sha256[i] for i in idx], dict(self.skipped), list(self.notes), list(self.ungrouped))

    def relpath(self, i: int) -> str:
        p = Path(self.paths[i])
        try:
            return str(p.relative_to(self.root))
        except ValueError:
            return str(p)

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame({"path": [self.relpath(i) for i in range(len(self))],
                             "label": [self.classes[k] for k in self.labels],
                             "patient": self.patients if self.patients is not None else None,
                             "sha256": self.sha256})


def _patients_from_regex(paths: list[str], regex: str) -> np.ndarray:
    names = [Path(p).name for p in paths]
    found = search_all(regex, names)  # in a child process with a time limit: a pattern may never end
    for name, m in zip(names, found):
        if m is None:
            raise DataError(f"patient regex {regex!r} (data.patient_regex) does not match file name {name!r}; "
                            "fix the regex (e.g. '^(Case-\\d+|P\\d+)') or give a patient column in a manifest CSV")
    return np.array(found, dtype=object)


def _from_folders(root: Path, skipped: dict[str, str] | None = None, notes: list[str] | None = None
                  ) -> tuple[list[str], list[str]]:
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    paths, labels = [], []
    for d in class_dirs:
        found, bad, extra = scan_class_folder(d)
        paths += found
        labels += [d.name] * len(found)
        if skipped is not None:
            skipped.update(bad)
        if notes is not None:
            notes += extra + ([empty_class_note(d)] if not found else [])
    if not paths:
        loose = [f for f in root.iterdir() if f.is_file() and is_readable_name(f)]
        hint = (" (images lie in the folder itself: put them in one sub-folder per class)" if loose else "")
        raise DataError(f"{root}: no images found in class sub-folders{hint}; expected "
                        "PATH/<class>/<image> or a manifest CSV with columns path,label[,patient]")
    return paths, labels


def read_table(csv: Path, required: set[str], expected: str, what: str = "CSV") -> pd.DataFrame:
    """A CSV as strings (empty cells stay ""); unreadable or missing ``required`` columns is one line."""
    size = csv.stat().st_size if csv.is_file() else 0
    if size > MAX_TABLE_BYTES:
        raise DataError(f"{csv}: {what} too large ({size:,} bytes, above the limit of {MAX_TABLE_BYTES:,}); "
                        "split it or check that it is the right file")
    try:
        df = read_csv(csv, dtype=str, keep_default_na=False)
    except Exception as e:
        raise DataError(f"{csv}: cannot read {what} ({str(e)[:80]})") from None
    missing = required - set(df.columns)
    if missing:
        raise DataError(f"{csv}: missing column(s) {sorted(missing)}; expected {expected}")
    return df


def _from_csv(csv: Path) -> tuple[list[str], list[str], list[str] | None]:
    df = read_table(csv, {"path", "label"}, "path,label[,patient]")
    check_csv(df, csv)
    base = csv.parent
    paths = [str(p if Path(p).is_absolute() else base / p) for p in df["path"]]
    check_listed_files(paths, csv)
    patients = list(df["patient"]) if "patient" in df.columns and (df["patient"] != "").all() else None
    return paths, list(df["label"]), patients


def resolve_data_path(path: str | None) -> Path:
    """``demo:NAME`` -> the built-in set; otherwise the path itself, which must exist."""
    if path is None:
        raise DataError("data.path is not set; pass the data with --data PATH (or --set data.path=PATH): a folder "
                        "of class sub-folders, a manifest CSV, or demo:NAME (`oncotransfer data demo` lists them)")
    if path.startswith("demo:"):
        from oncotransfer.data.demo import demo_path
        return demo_path(path[5:])
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data path {str(p)!r} does not exist; give a folder of class sub-folders or a manifest CSV")
    return p


def load_manifest(path: str | Path, patient_regex: str | None = None, min_classes: int = 2,
                  dicom_frames: str = "middle") -> Manifest:
    """Read a class-per-folder tree, a manifest CSV, or a folder holding ``manifest.csv``.

    Multi-frame files (DICOM objects, NIfTI volumes) become one row per frame that ``dicom_frames`` selects,
    with their group (hashed PatientID, volume) as patient (data/frames.py); unusable ones are left out with
    their reason in ``skipped``."""
    if path is None:
        raise DataError("data.path is not set; this config names no data: pass it with --data PATH (or --set "
                        "data.path=PATH): a folder of class sub-folders, a manifest CSV or demo:NAME")
    p = resolve_data_path(str(path))
    patients, skipped, notes = None, {}, []
    if not p.is_dir() and regular_file_problem(p):
        raise DataError(f"{p}: {regular_file_problem(p)}; give a folder of class sub-folders or a manifest CSV")
    if p.is_file() and is_image_name(p):
        raise DataError(f"{p}: is an image, not a data set; give its folder of class sub-folders or a manifest CSV")
    if p.is_file():
        paths, labels, patients = _from_csv(p)
        root = p.parent
    elif (p / "manifest.csv").is_file():
        paths, labels, patients = _from_csv(p / "manifest.csv")
        root = p
    else:
        if not any(p.iterdir()):
            raise DataError(f"{p}: the folder is empty; expected one sub-folder of images per class")
        paths, labels = _from_folders(p, skipped, notes)
        root = p
    if patient_regex:
        patients = list(_patients_from_regex(paths, patient_regex))
    sha, ungrouped = None, []
    if any(framed_reader(f) is not None for f in paths):
        rows = expand_rows(paths, labels, patients, dicom_frames, sha256_file)
        paths, labels, patients, sha = rows.paths, rows.labels, rows.patients, rows.sha256
        skipped.update(rows.skipped)
        ungrouped = rows.without_group or []
        if not paths:
            raise DataError(f"{p}: none of the {len(rows.skipped)} multi-frame file(s) (DICOM, NIfTI) is usable, e.g. "
                            f"{next(iter(rows.skipped.values()))}")
    classes = sorted(set(labels))
    if len(classes) < min_classes:
        raise DataError(f"{p}: found only {len(classes)} class ({classes}); a classifier needs at least "
                        f"{min_classes}: add a sub-folder per class")
    index = {c: i for i, c in enumerate(classes)}
    return Manifest(root, paths, np.array([index[c] for c in labels]), classes,
                    None if patients is None else np.array(patients, dtype=object),
                    sha if sha is not None else [_sha256_or_marker(f) for f in paths], skipped, notes, ungrouped)


def _sha256_or_marker(path: str) -> str:
    """A file that cannot be opened (permissions) or is too large to hash (a sparse terabyte file) gets a unique
    marker; decoding then names it as unreadable or too large."""
    if file_too_large(path):
        return f"too-large:{path}"
    try:
        return sha256_file(path)
    except OSError as e:
        return f"unreadable:{path}:{e.strerror}"


def drop(manifest: Manifest, failed: dict[int, str]) -> Manifest:
    """Leave out unreadable images, remembering why."""
    keep = [i for i in range(len(manifest)) if i not in failed]
    out = manifest.subset(keep)
    out.skipped.update({manifest.paths[i]: why for i, why in failed.items()})
    return out


def duplicate_groups(sha256: list[str], phash: np.ndarray | None = None, max_distance: int = 4) -> np.ndarray:
    """Group id per image: identical bytes, or pHash within ``max_distance`` bits, share a group."""
    n = len(sha256)
    sets = UnionFind(range(n))
    first: dict[str, int] = {}
    for i, h in enumerate(sha256):
        if h in first:
            sets.union(i, first[h])
        first.setdefault(h, i)
    if phash is not None and n > 1:
        bits = np.unpackbits(phash.view(np.uint8).reshape(n, 8), axis=1).astype(np.uint8)
        for i in range(n - 1):
            dist = np.count_nonzero(bits[i + 1:] != bits[i], axis=1)
            for j in np.nonzero(dist <= max_distance)[0]:
                sets.union(i, i + 1 + int(j))
    roots = [sets.find(i) for i in range(n)]
    _, ids = np.unique(roots, return_inverse=True)
    return ids
