"""Hostile names against the tool's outputs (issue 22): class names, labels and file names that are spreadsheet
formulas (CSV injection) or terminal escapes, the id-hashing key, and hostile DICOM identifiers.

Judged on what a reader of the outputs would meet: a CSV cell a spreadsheet would run ("security"), a raw control
character in what the terminal prints ("security"), a name that does not round-trip through the tool's own CSV
readers ("silent"), a weak id-hashing key used without a word ("security").
"""
from __future__ import annotations

import csv
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from core import Case, newest_run  # noqa: E402

FAMILY = "outputs"
TRIGGERS = {"eq": "=", "plus": "+", "minus": "-", "at": "@", "tab": "\t", "cr": "\r"}
FORMULAS = {"eq": '=HYPERLINK("http:evil","x")', "plus": "+1+1", "minus": "-2+3", "at": "@SUM(1)",
            "tab": "\t=1", "cr": "\r=1", "quote_eq": "'=1"}
ESCAPES = {"osc_title": "\x1b]0;pwned\x07", "csi_clear": "\x1b[2J\x1b[3J", "bel": "\x07", "c1_csi": "\x9b31m",
           "backspace": "ab\x08\x08", "cr": "over\rwrite", "bidi": "\u202egnp", "del": "x\x7f"}
MARKUP = {"red": "[red]x", "link": "[link=evil]x", "emoji": ":skull:x"}
CLASSES = ('=HYPERLINK("http:evil")', "-1")
SALT = "hostile-outputs-salt-0123456789"


def _controls(text: str) -> list[str]:
    return sorted({repr(c) for c in text if (ord(c) < 32 and c not in "\n\t") or 0x7f <= ord(c) <= 0x9f
                   or 0x202a <= ord(c) <= 0x202e})


def no_raw_controls(r, t) -> tuple[str, str] | None:
    bad = _controls(r.out)
    return ("security", f"raw control characters printed: {bad}") if bad else None


def live_cells(path: Path) -> list[str]:
    """Cells of a CSV that a spreadsheet would run as a formula."""
    with open(path, newline="", encoding="utf-8") as f:
        return [c for row in csv.reader(f) for c in row if c[:1] in ("=", "+", "-", "@", "\t", "\r")
                and not _number(c)]


def _number(c: str) -> bool:
    try:
        float(c)
        return c[:1] == "-"  # a negative number in a numeric column: a spreadsheet shows the number
    except ValueError:
        return False


def csv_safe(*names: str, want: set[str] | None = None):
    """Check: the CSVs (relative to the newest run, or absolute) hold no live formula, and ``want`` (names that
    must come back through the tool's reader) round-trips; no raw control characters printed."""
    def check(r, t):
        found = no_raw_controls(r, t)
        if found:
            return found
        from oncotransfer.io import read_csv
        for name in names:
            p = Path(name) if Path(name).is_absolute() else newest_run(t) / name
            if not p.is_file():
                return "silent", f"{p.name} not written"
            bad = live_cells(p)
            if bad:
                return "security", f"{p.name}: formula cells {bad[:3]!r}"
            if want:
                cells = {str(v) for v in read_csv(p, dtype=str, keep_default_na=False).to_numpy().ravel()}
                cells |= {Path(v).name for v in cells} | {Path(v).parent.name for v in cells}
                lost = sorted(w for w in want if w not in cells)
                if lost:
                    return "silent", f"{p.name}: {lost[:3]!r} did not round-trip"
        return None
    return check


def _image(path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path, format="PNG")


def hostile_data(root: Path) -> Path:
    """Two classes named like formulas; distinct images named like formulas and escapes in both."""
    k = 0
    for ci, c in enumerate(CLASSES):
        for i in range(4):
            _image(root / c / f"img{i}.png", k)
            k += 1
        for key, f in FORMULAS.items():
            _image(root / c / f"{f}{ci}.png", k)
            k += 1
    return root


def config(t: Path, data: Path) -> Path:
    p = t / "hostile.yaml"
    p.write_text(f"name: hostile\ndata: {{path: '{data}', image_size: 32}}\noutput_dir: '{t / 'runs'}'\n"
                 "split: {kind: kfold, folds: 2, group_by_patient: false, allow_image_level_split: true}\n"
                 "model: {backbone: efficientnet_lite0, weights: efficientnet_lite0_packaged, freeze: frozen}\n"
                 f"train: {{epochs: 2, batch_size: 8, feature_engine: torch, cache_dir: '{t / 'cache'}', "
                 "num_workers: 0}\nevaluate: {bootstrap: 0}\n")
    return p


def dicom(path: Path, **ids: str) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = UltrasoundImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID = "MRN4711", "1.2.3", "1.2.3.4"
    ds.Modality, ds.Manufacturer = "US", "Vendor"
    for k, v in ids.items():
        setattr(ds, k, v)
    ds.set_pixel_data(np.random.default_rng(len(str(path))).integers(0, 255, (16, 16), dtype=np.uint8),
                      "MONOCHROME2", 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def build(t: Path) -> list[Case]:
    data = hostile_data(t / "data")
    run_names = {f"{f}{ci}.png" for ci in range(2) for f in FORMULAS.values()} | set(CLASSES)
    both = csv_safe("split.csv", "predictions.csv", want=run_names)
    history = csv_safe("history.csv")
    cases = [Case(FAMILY, "train with formula class and file names", ["train", str(config(t, data))], False,
                  check=lambda r, tt: both(r, tt) or history(r, tt), timeout=600)]
    cases.append(Case(FAMILY, "evaluate re-reads predictions.csv with formula labels", [], False,
                      check=csv_safe("predictions.csv", want=run_names), timeout=300))
    cases[-1].args = ["evaluate", "RUN"]
    cases.append(Case(FAMILY, "evaluate --data: overlap check re-reads split.csv", [], False, ("overlap",),
                      check=csv_safe("split.csv", want=run_names), timeout=300))
    cases[-1].args = ["evaluate", "RUN", "--data", str(data)]
    # predict: one hostile file name per case, its CSV checked and read back
    pdir = t / "pred"
    for key, f in {**FORMULAS, **{f"esc_{k}": v for k, v in ESCAPES.items()},
                   **{f"markup_{k}": v for k, v in MARKUP.items()}}.items():
        name = f"{f}.png"
        _image(pdir / key / name, hash(key) % 1000)
        out = t / f"pred_{key}.csv"
        cases.append(Case(FAMILY, f"predict file named {key}: CSV and table", ["predict", "RUN", str(pdir / key),
                          "--out", str(out)], False, check=csv_safe(str(out), want={name}), timeout=300))
    # printed places x escape kinds: data inspect (class table, unreadable warning), a missing path's error line
    for key, esc in {**ESCAPES, **MARKUP}.items():
        root = t / f"insp_{key}"
        for c in (f"cls{esc}", "plain"):
            for i in range(2):
                _image(root / c / f"i{i}.png", i + len(c))
        (root / "plain" / f"bad{esc}.png").write_bytes(b"junk, not an image")
        literal = esc if key in MARKUP else None
        cases.append(Case(FAMILY, f"inspect class and bad file named {key}", ["data", "inspect", str(root)], False,
                          (f"cls{literal}", f"bad{literal}.png") if literal else ("unreadable",),
                          check=no_raw_controls))
        cases.append(Case(FAMILY, f"inspect --json with {key}", ["data", "inspect", str(root), "--json"], False,
                          check=no_raw_controls))
        cases.append(Case(FAMILY, f"error line for a missing path named {key}",
                          ["data", "inspect", str(t / f"missing{esc}")], True, ("does not exist",),
                          check=no_raw_controls))
        cases.append(Case(FAMILY, f"missing train config named {key}", ["train", str(t / f"cfg{esc}.yaml")], True,
                          ("does not exist",), check=no_raw_controls))
    cases += dicom_cases(t)
    for c in cases:
        if "RUN" in c.args:
            c.setup = _resolve_run(c, t)
    return cases


def _resolve_run(c: Case, t: Path):
    template = list(c.args)

    def setup() -> None:
        run = newest_run(t)
        c.args = [str(run) if a == "RUN" else a for a in template]
    return setup


def dicom_cases(t: Path) -> list[Case]:
    try:
        import pydicom  # noqa: F401
    except ImportError:
        return []
    d = t / "dicom"
    for i in range(3):
        dicom(d / "a" / f"a{i}.dcm", PatientID=f"MRN{i}")
        dicom(d / "b" / f"b{i}.dcm", PatientID=f"MRN{10 + i}")
    inspect = ["data", "inspect", str(d)]
    home = t / "keyhome"

    def key_file(kind: str):
        def setup() -> None:
            f = home / kind / "oncotransfer" / "id_salt"
            shutil.rmtree(f.parent, ignore_errors=True)
            f.parent.mkdir(parents=True)
            if kind == "fifo":
                os.mkfifo(f)
            elif kind == "dev_zero":
                f.symlink_to("/dev/zero")
            elif kind == "dir":
                f.mkdir()
            else:
                f.write_bytes({"empty": b"", "short": b"0123456789", "huge": b"k" * 50_000_000,
                               "good": b"g" * 64}[kind])
        return setup
    cases = []
    for name, value, bad in (("empty", "", True), ("blank", "    ", True), ("short", "abc", True),
                             ("15 bytes", "x" * 15, True), ("16 bytes", "x" * 16, False)):
        cases.append(Case(FAMILY, f"ONCOTRANSFER_ID_SALT {name}", inspect, bad,
                          ("ONCOTRANSFER_ID_SALT", "at least 16") if bad else ("DICOM: 6 object(s)",),
                          env={"ONCOTRANSFER_ID_SALT": value}, timeout=60))
    for kind in ("empty", "short", "huge", "fifo", "dev_zero", "dir", "good"):
        env = {"XDG_CONFIG_HOME": str(home / kind)}
        c = Case(FAMILY, f"id key file {kind}", inspect, kind != "good",
                 ("id-hashing key file",) if kind != "good" else ("DICOM: 6 object(s)",), env=env,
                 setup=key_file(kind), timeout=60)
        c.env["ONCOTRANSFER_ID_SALT"] = ""  # replaced below: the key file is used only without the variable
        cases.append(c)
    for c in cases[-7:]:
        c.cmd = [sys.executable, "-c", "import os, sys, runpy; os.environ.pop('ONCOTRANSFER_ID_SALT', None); "
                 "sys.argv = ['oncotransfer', *sys.argv[1:]]; runpy.run_module('oncotransfer.cli', run_name='__main__')",
                 *inspect]
    # hostile identifiers: skipped as unreadable, the value never printed
    for key, ids in {"PatientID escape": {"PatientID": "MRN\x1b]0;pwned\x07"},
                     "PatientID 65 chars": {"PatientID": "M" * 65},
                     "StudyUID CR": {"StudyInstanceUID": "1.2\r3"},
                     "SeriesUID long": {"SeriesInstanceUID": "1." * 40},
                     "Manufacturer escape": {"Manufacturer": "V\x1b[2J\x9b" + "v" * 100}}.items():
        root = t / f"dcm_{key.replace(' ', '_')}"
        shutil.copytree(d, root)
        dicom(root / "a" / "hostile.dcm", **ids)
        skipped = "Manufacturer" not in key
        value = next(iter(ids.values()))

        def check(r, tt, value=value, key=key):
            found = no_raw_controls(r, tt)
            if found:
                return found
            from oncotransfer.cli_output import safe_text
            if not key.startswith("Manufacturer") and (value in r.out or safe_text(value) in r.out):
                return "security", "the raw identifier was printed"
            return None
        cases.append(Case(FAMILY, f"DICOM {key}", ["data", "inspect", str(root)], False,
                          ("hostile.dcm", "not a valid DICOM identifier") if skipped else ("DICOM: 7 object(s)",),
                          check=check, env={"ONCOTRANSFER_ID_SALT": SALT}, timeout=60))
    for c in cases:
        c.env.setdefault("ONCOTRANSFER_ID_SALT", SALT)
    return cases
