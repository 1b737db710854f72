"""Checks on a data set at load time, before any training: bad manifest rows, silent drops, label conflicts.

Every problem is one line naming the row, file or class; nothing is dropped without a word."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from oncotransfer.data.readers import is_readable_name, known_suffixes, regular_file_problem
from oncotransfer.errors import DataError


def _lines(rows: list[int], limit: int = 8) -> str:
    """CSV line numbers (the header is line 1) of data rows ``rows`` (0-based)."""
    shown = ", ".join(str(r + 2) for r in rows[:limit])
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def check_csv(df: pd.DataFrame, csv: Path) -> None:
    """Empty path, label or patient cells and repeated paths are errors naming the lines: an empty label would
    fail only after training; an empty patient cell used to drop patient grouping altogether (leakage)."""
    for col, why in (("path", "give every row a file path"), ("label", "give every row its class label")):
        empty = np.nonzero(df[col].str.strip() == "")[0].tolist()
        if empty:
            raise DataError(f"{csv}: empty {col} cell on line(s) {_lines(empty)} (header = line 1); {why}")
    if "patient" in df.columns:
        empty = np.nonzero(df["patient"].str.strip() == "")[0].tolist()
        if empty and len(empty) < len(df):
            raise DataError(f"{csv}: empty patient cell on line(s) {_lines(empty)} (header = line 1) of {len(df)} "
                            "rows; fill in every patient id (a split cannot group images without one), or drop "
                            "the patient column to split without patients")
    dup = df["path"].duplicated(keep=False)
    if dup.any():
        first = df.loc[dup, "path"].iloc[0]
        rows = np.nonzero((df["path"] == first).to_numpy())[0].tolist()
        raise DataError(f"{csv}: {int(dup.sum())} rows repeat a path, e.g. {first!r} on lines {_lines(rows)} "
                        "(header = line 1); list each image once (a repeated row would train twice)")


def check_listed_files(paths: list[str], csv: Path) -> None:
    """Listed files must be regular files (not folders, devices or symlink loops)."""
    bad = [(p, regular_file_problem(p)) for p in paths]
    bad = [(p, why) for p, why in bad if why]
    if bad:
        missing = [p for p, why in bad if why.startswith("cannot be read")]
        if len(missing) == len(bad):
            raise DataError(f"{csv}: {len(bad)} listed file(s) do not exist, e.g. {bad[0][0]!r}")
        raise DataError(f"{csv}: {len(bad)} listed path(s) are not readable image files, e.g. {bad[0][0]!r}: "
                        f"{bad[0][1]}")


def scan_class_folder(d: Path) -> tuple[list[str], dict[str, str], list[str]]:
    """(files some reader owns, {path: why skipped} for image-named entries that are not regular files and for
    files without a suffix that no reader recognises, notes). A suffix-less file is what a PACS export or a
    truncated object looks like: it is named, not passed over (other suffixes, e.g. notes.txt, are not data)."""
    found, skipped, notes = [], {}, []
    for f in sorted(d.rglob("*")):
        if is_readable_name(f):
            why = regular_file_problem(f)
            if why is None:
                found.append(str(f))
            elif not why.startswith("a folder"):
                skipped[str(f)] = f"{f}: {why}"
        elif not f.suffix and not f.name.startswith(".") and not f.is_dir():
            why = regular_file_problem(f)
            skipped[str(f)] = f"{f}: " + (why or "no suffix, and no DICOM or image signature: not a file any "
                                          "reader knows (a truncated DICOM object?)")
        if f.is_symlink() and f.is_dir():
            notes.append(f"symbolic link to a folder not followed: {f}")
    return found, skipped, notes


def empty_class_note(d: Path) -> str:
    return (f"class folder {d.name!r} ({d}) holds no images ({', '.join(sorted(known_suffixes()))}) and is "
            "left out; remove it or add its images")


def check_label_conflicts(paths: list[str], labels: np.ndarray, classes: list[str], sha256: list[str]) -> None:
    """The same bytes under two labels: the model would be asked to learn both answers for one image."""
    by_sha: dict[str, set[int]] = defaultdict(set)
    first: dict[tuple[str, int], str] = {}
    for p, y, h in zip(paths, labels, sha256):
        by_sha[h].add(int(y))
        first.setdefault((h, int(y)), p)
    conflicts = [h for h, ys in by_sha.items() if len(ys) > 1]
    if conflicts:
        h = conflicts[0]
        shown = "; ".join(f"{first[(h, y)]} ({classes[y]})" for y in sorted(by_sha[h]))
        raise DataError(f"{len(conflicts)} image(s) are byte-identical under two labels, e.g. {shown}; "
                        "keep each image under its one true class")


def check_classes_present(labels: np.ndarray, classes: list[str], failed: dict[str, str], where: str) -> None:
    """A class whose every file is unreadable would train as if it did not exist (imbalance 1.00)."""
    have = set(np.asarray(labels).tolist())
    gone = [c for k, c in enumerate(classes) if k not in have]
    if gone:
        example = next(iter(failed.values()), "")
        raise DataError(f"{where}: class(es) {gone} have no readable image (every file failed to decode"
                        + (f", e.g. {example}" if example else "") + "); fix or remove those files")


def skipped_summary(skipped: dict[str, str], where: str, limit: int = 3) -> str | None:
    """The terminal line for skipped files: the count, the first few names and where the full list is."""
    if not skipped:
        return None
    names = ", ".join(Path(p).name for p in list(skipped)[:limit])
    more = f" and {len(skipped) - limit} more" if len(skipped) > limit else ""
    return f"warning: {len(skipped)} file(s) skipped as unreadable: {names}{more} (full list with reasons: {where})"
