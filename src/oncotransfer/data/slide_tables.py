"""The tables beside slides: the labels CSV of ``slides tile`` (slide,label[,patient]) and the tiling.json it
writes, which ``predict --slide`` reads to cut tiles as training did. Both are checked, one line per defect."""
from __future__ import annotations

import json
import math
from pathlib import Path

from oncotransfer.data.manifest import read_table
from oncotransfer.data.readers.base import one_line
from oncotransfer.data.readers.slide import SLIDE_SUFFIXES
from oncotransfer.data.tissue import TISSUE_MODES
from oncotransfer.errors import DataError

__all__ = ["read_labels", "check_labels", "read_tiling"]


def read_labels(csv: str | Path) -> dict[str, tuple[str, str | None]]:
    """slide (file stem or file name) -> (label, patient or None) from a CSV with columns slide,label[,patient].
    Empty slide or label cells, and one slide given two labels (or patients), are one ``DataError`` naming the
    lines: a tile labelled "" or by whichever row came last would train on a wrong target without a word."""
    csv = Path(csv)
    df = read_table(csv, {"slide", "label"}, "slide,label[,patient]", "labels CSV")
    empty = [i + 2 for i, (s, y) in enumerate(zip(df["slide"], df["label"])) if not s.strip() or not y.strip()]
    if empty:
        raise DataError(f"{csv}: empty slide or label cell on line(s) {_lines(empty)}; every row needs slide,label")
    out: dict[str, tuple[str, str | None]] = {}
    line: dict[str, int] = {}
    patients = df["patient"] if "patient" in df.columns else [""] * len(df)
    for i, (name, label, patient) in enumerate(zip(df["slide"], df["label"], patients)):
        key = Path(name).stem if Path(name).suffix.lower() in SLIDE_SUFFIXES else name
        row = (label, patient or None)
        if key in out and out[key] != row:
            raise DataError(f"{csv}: lines {line[key]} and {i + 2} give slide {key!r} conflicting rows "
                            f"({','.join(x or '' for x in out[key])} vs {','.join(x or '' for x in row)}); keep one")
        out[key], line[key] = row, line.get(key, i + 2)
    return out


def _lines(numbers: list[int]) -> str:
    return ", ".join(map(str, numbers[:5])) + (f" and {len(numbers) - 5} more" if len(numbers) > 5 else "")


def check_labels(table: dict, slides: list[Path], skipped: dict[str, str], labels: str | Path, source: str | Path
                 ) -> None:
    """Every slide has a label and, for a folder, every labelled slide is in it: a row naming a slide that is
    not there is a slide missing from the data set (or a misspelt name), never to be passed over quietly. One
    slide file given alone may take its row from a cohort-wide CSV."""
    unlabelled = [p.name for p in slides if p.stem not in table]
    if unlabelled:
        raise DataError(f"{labels}: no label for slide(s) {unlabelled[:3]}"
                        f"{' and more' if len(unlabelled) > 3 else ''}; add a row slide,label per slide")
    if Path(source).is_file():
        return
    present = {p.stem for p in slides} | {Path(f).stem for f in skipped}
    absent = sorted(k for k in table if k not in present)
    if absent:
        raise DataError(f"{labels}: slide(s) {absent[:5]}{f' and {len(absent) - 5} more' if len(absent) > 5 else ''}"
                        f" are not in {source}; add the slide files or remove their rows")


TILING_FIELDS = {"tile_size": int, "mpp": (int, float, type(None)), "magnification": (int, float, type(None)),
                 "min_tissue": (int, float), "tissue": str, "slides": list}


def read_tiling(path: str | Path) -> dict:
    """A tiling.json written by ``slides tile``, checked: what ``predict --slide`` cuts tiles by. Damage (not
    JSON, a field of the wrong type or out of range) is one ``DataError`` naming the file and field, not a
    silent fall back to other tile sizes or resolutions than training's."""
    path = Path(path)
    fix = "run `oncotransfer slides tile` again, or repair or delete it"
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: damaged tiling.json ({one_line(e, 80)}); {fix}") from None
    if not isinstance(info, dict):
        raise DataError(f"{path}: damaged tiling.json (not an object); {fix}")
    for key, kind in TILING_FIELDS.items():
        v = info.get(key)
        if key in info and (not isinstance(v, kind) or isinstance(v, bool)):
            raise DataError(f"{path}: damaged tiling.json ({key} is {v!r}); {fix}")
    bad = [k for k in ("tile_size", "mpp", "magnification") if not _positive_or_none(info.get(k))]
    if "tile_size" in info and info["tile_size"] < 16:
        bad.append("tile_size")
    if "min_tissue" in info and not 0 <= info["min_tissue"] <= 1:
        bad.append("min_tissue")
    if isinstance(info.get("tissue"), str) and info["tissue"] not in TISSUE_MODES:
        bad.append("tissue")
    slides = info.get("slides") or []
    if not all(isinstance(s, dict) and _positive_or_none(s.get("mpp")) for s in slides):
        bad.append("slides")
    if bad:
        raise DataError(f"{path}: damaged tiling.json ({bad[0]} is {info.get(bad[0])!r}"[:200] + f"); {fix}")
    return info


def _positive_or_none(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0)
