"""Hostile family "overlap": ``evaluate RUN --data FOLDER`` where FOLDER holds transformed copies of the run's own
training images (flips, quarter-turns, small rotations, crops, padding, brightness, contrast, JPEG, resizing,
blur, noise; one folder per transform and size) or truly distinct images (as they are, flipped, cropped), and
the overlap count printed and in metrics_report_external.json must be exactly the number of copies.

One small run (efficientnet_lite0, packaged weights, frozen, 64 px, 48 demo:busi images; holdout that selects
its epoch on the test rows, so all 48 images trained or selected the model) serves every case.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np

from core import ROOT, Case, Result, newest_run

_spec = importlib.util.spec_from_file_location("overlap_bench", ROOT / "benchmarks" / "overlap.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

N_TRAIN = 48
KNOWN_NEAR_DUPLICATES = {"benign (119)", "benign (122)", "benign (21)", "benign (154)", "benign (242)", "benign (288)", "benign (333)",
                         "malignant (4)", "malignant (5)", "malignant (7)", "malignant (15)", "malignant (111)",
                         "malignant (77)", "malignant (78)"}
"""BUSI scans that are re-cropped or shifted copies of another (pHash 6-14 bits apart: beyond the splits' grouping),
found by benchmarks/overlap.py and looked at one by one: never "distinct" here."""
SIZES = (3, 8)


def _demo() -> tuple[Path, list[tuple[str, str]], list[tuple[str, str]]]:
    """(demo:busi root, 48 training (relpath, label), distinct (relpath, label)): distinct images share no
    duplicate group (sha256 or pHash within 4 bits) with any training image."""
    import sys
    sys.path.insert(0, str(ROOT / "src"))
    from oncotransfer.data.manifest import duplicate_groups, load_manifest, resolve_data_path
    from oncotransfer.data.images import decode_many
    root = resolve_data_path("demo:busi")
    m = load_manifest(str(root), None)
    _, ok, _, ph = decode_many(m.paths, 64, phash=True)
    groups = duplicate_groups([m.sha256[i] for i in ok], ph)
    rows = [(m.relpath(i), m.classes[m.labels[i]]) for i in ok]
    rng = np.random.default_rng(22)
    train = []
    for cls in sorted(set(r[1] for r in rows)):
        idx = [k for k, r in enumerate(rows) if r[1] == cls]
        train += [int(k) for k in rng.choice(idx, N_TRAIN // 2, replace=False)]
    used = set(groups[train].tolist())
    distinct = [k for k in range(len(rows)) if groups[k] not in used
                and Path(rows[k][0]).stem not in KNOWN_NEAR_DUPLICATES]
    rng.shuffle(distinct)
    return Path(root), [rows[k] for k in train], [rows[k] for k in distinct]


def _folder(dst: Path, root: Path, rows: list[tuple[str, str]], transform: str | None) -> Path:
    from PIL import Image
    for k, (rel, label) in enumerate(rows):
        out = dst / label / f"img{k}"
        if transform is None:
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(root / rel, out.with_suffix(Path(rel).suffix))
        else:
            bench.write(Image.open(root / rel), transform, out)
    return dst


def _config(t: Path, data: Path) -> str:
    p = t / "cfg.yaml"
    p.write_text(f"name: ov\ndata: {{path: '{data}', image_size: 64}}\noutput_dir: '{t / 'runs'}'\n"
                 "split: {kind: holdout, test_size: 0.25, val_size: 0.0, group_by_patient: false, "
                 "group_duplicates: true, allow_image_level_split: true}\n"
                 "model: {backbone: efficientnet_lite0, weights: efficientnet_lite0_packaged, freeze: frozen}\n"
                 f"train: {{epochs: 2, batch_size: 8, feature_engine: torch, cache_dir: '{t / 'cache'}', "
                 "num_workers: 0}\nevaluate: {bootstrap: 0}\n")
    return str(p)


def _expect(n: int, overlapping: int):
    def check(r: Result, t: Path) -> tuple[str, str] | None:
        flat = " ".join(r.out.split())
        try:
            ov = json.loads((newest_run(t) / "metrics_report_external.json").read_text())["overlap"]
        except (OSError, KeyError, ValueError) as e:
            return "silent", f"no overlap in metrics_report_external.json ({e})"
        if (ov["n"], ov["overlapping"]) != (n, overlapping):
            return "silent", f"overlap {ov['overlapping']} of {ov['n']}, expected {overlapping} of {n}"
        said = f"{overlapping} of {n} images overlap"
        if overlapping and said not in flat:
            return "silent", f"the terminal does not say {said!r}"
        if not overlapping and "images overlap" in flat:
            return "silent", "the terminal names an overlap that metrics do not hold"
        return None
    return check


def _case(t: Path, name: str, folder: Path, n: int, overlapping: int) -> Case:
    c = Case("overlap", name, ["evaluate", "RUN", "--data", str(folder)], False, check=_expect(n, overlapping),
             timeout=180)
    c.setup = lambda: c.args.__setitem__(1, str(newest_run(t)))
    return c


def build(t: Path) -> list[Case]:
    root, train, distinct = _demo()
    data = _folder(t / "train", root, train, None)
    cases = [Case("overlap", "train the run every case scores", ["train", _config(t, data)], False, timeout=600)]
    for name in bench.TRANSFORMS:
        for k in SIZES:
            # a different slice of the training images per size: more of them seen across the cases
            rows = train[(k * 5) % N_TRAIN:][:k] if k < N_TRAIN else train
            folder = _folder(t / "sets" / f"{name}_{k}", root, rows, name)
            cases.append(_case(t, f"{k} {name} copies of training images", folder, k, k))
    for k in (4, 12):
        cases.append(_case(t, f"{k} distinct images", _folder(t / "sets" / f"distinct_{k}", root, distinct[:k], None),
                           k, 0))
    for name in ("hflip", "rot90", "crop20", "rot10"):
        folder = _folder(t / "sets" / f"distinct_{name}", root, distinct[12:20], name)
        cases.append(_case(t, f"8 distinct images, {name}", folder, 8, 0))
    mixed = t / "sets" / "mixed"
    _folder(mixed / "copies", root, train[:6], "rot5")
    _folder(mixed / "new", root, distinct[20:26], None)
    flat = t / "sets" / "mixed_flat"  # class folders at the top: copies and distinct side by side
    for p in mixed.rglob("*.*"):
        dst = flat / p.parent.name / f"{p.parent.parent.name}_{p.name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dst)
    cases.append(_case(t, "6 rotated copies among 6 distinct images", flat, 12, 6))
    return cases
