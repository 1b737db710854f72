"""Hostile data and config cases through the real command line (issue 12: ingestion and validation).

Each case runs ``python -m oncotransfer.cli ...`` in a subprocess and is judged:
  traceback  - "Traceback" anywhere in the output
  hang       - still running after the time limit
  silent     - a silent wrong result: exit 0 where an error was due, an error or warning that does not name what
               it should, a run folder left behind by a failed validation, or a file written outside output_dir
Prints one row per case and the totals.  Usage: PYTHONPATH=src python benchmarks/faults_ingest.py [--quick]
(--quick leaves out the cases that train a model; --only=TEXT runs the cases whose name holds TEXT).
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 180


@dataclass
class Case:
    name: str
    args: list[str]
    want_error: bool
    needles: tuple[str, ...] = ()
    no_run_folder: bool = False


def png_header(w: int, h: int) -> bytes:
    c = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    return (b"\x89PNG\r\n\x1a\n" + c(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + c(b"IDAT", zlib.compress(b"")) + c(b"IEND", b""))


def images(root: Path, per_class: int = 4, classes=("a", "b")) -> Path:
    rng = np.random.default_rng(0)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = np.clip(rng.normal(60 + 120 * k, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / c / f"{c}{i}.png")
    return root


def manifest(root: Path, rows: list[str], header: str = "path,label") -> Path:
    images(root)
    (root / "manifest.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    return root / "manifest.csv"


def config(t: Path, data: str | Path, extra: str = "") -> str:
    p = t / f"cfg{len(list(t.glob('cfg*.yaml')))}.yaml"
    p.write_text(f"name: f\ndata: {{path: '{data}', image_size: 32}}\noutput_dir: '{t / 'runs'}'\n"
                 "split: {kind: holdout, test_size: 0.25, val_size: 0.0, group_by_patient: false, "
                 "group_duplicates: true, allow_image_level_split: true}\n"
                 "model: {backbone: efficientnet_lite0, weights: none, freeze: frozen}\n"
                 f"train: {{epochs: 2, batch_size: 4, feature_engine: torch, cache_dir: '{t / 'cache'}', "
                 "num_workers: 0}\nevaluate: {bootstrap: 0}\n" + extra)
    return str(p)


def build(t: Path, quick: bool) -> list[Case]:
    good = images(t / "good")
    rows = [f"{c}/{c}{i}.png,{c}" for c in "ab" for i in range(4)]
    cases = [Case("inspect missing path", ["data", "inspect", str(t / "nope")], True, ("does not exist",)),
             Case("inspect empty folder", ["data", "inspect", str((t / "empty").resolve())], True, ("empty",)),
             Case("inspect /dev/null", ["data", "inspect", "/dev/null"], True, ("not a regular file",)),
             Case("inspect one image file", ["data", "inspect", str(good / "a" / "a0.png")], True, ("is an image",))]
    (t / "empty").mkdir()
    hostile = {"bomb30000.png": png_header(30000, 30000), "big9000.png": png_header(9000, 9000),
               "trunc.jpg": None, "noise.png": os.urandom(500), "zero.jpg": b"",
               "[red]markup.png": b"\x89PNG\r\n\x1a\nbroken", "text.bmp": b"BM" + b"hello" * 20,
               "trunc.tif": None, "wide.bmp": None}
    buf = t / "seed.jpg"
    Image.open(good / "a" / "a0.png").save(buf, "JPEG")
    Image.open(good / "a" / "a0.png").save(t / "seed.tif", "TIFF")
    Image.open(good / "a" / "a0.png").save(t / "seed.bmp", "BMP")
    hostile["trunc.jpg"] = buf.read_bytes()[:300]
    hostile["trunc.tif"] = (t / "seed.tif").read_bytes()[:200]
    wide = bytearray((t / "seed.bmp").read_bytes())
    wide[18:26] = struct.pack("<ii", 2**31 - 1, 7)
    hostile["wide.bmp"] = bytes(wide)
    for name, data in hostile.items():
        d = images(t / f"h_{len(cases)}")
        (d / "a" / name).write_bytes(data)
        want = {"bomb30000.png": "too large", "big9000.png": "9000 x 9000", "wide.bmp": "too large"}.get(name, name)
        cases.append(Case(f"inspect hostile {name}", ["data", "inspect", str(d)], False, (name, want)))
    d = images(t / "loop")
    os.symlink("loop.png", d / "a" / "loop.png")
    cases.append(Case("inspect symlink loop", ["data", "inspect", str(d)], False, ("loop.png", "symlink loop")))
    d = images(t / "emptyclass")
    (d / "tumour").mkdir()
    cases.append(Case("inspect empty class folder", ["data", "inspect", str(d)], False, ("'tumour'", "no images")))
    d = images(t / "allbad")
    (d / "c").mkdir()
    for i in range(3):
        (d / "c" / f"bad{i}.png").write_bytes(b"\x89PNG\r\n\x1a\nno")
    cases.append(Case("inspect all-unreadable class", ["data", "inspect", str(d)], False, ("no readable image",)))
    csvs = {"empty label": (rows[:2] + ["a/a2.png,"] + rows[3:], "path,label", "empty label cell on line(s) 4"),
            "empty patient": ([r + (",P1" if i else ",") for i, r in enumerate(rows)], "path,label,patient",
                              "empty patient cell on line(s) 2"),
            "repeated row": (rows + [rows[0]], "path,label", "repeat a path"),
            "lists /dev/null": (rows + ["/dev/null,a"], "path,label", "/dev/null"),
            "lists a missing file": (rows + ["a/nope.png,a"], "path,label", "do not exist"),
            "no label column": (["a/a0.png"], "path", "missing column")}
    for what, (r, header, needle) in csvs.items():
        m = manifest(t / f"csv_{len(cases)}", r, header)
        cases.append(Case(f"inspect csv {what}", ["data", "inspect", str(m)], True, (needle,)))
        cases.append(Case(f"train csv {what}", ["train", config(t, m)], True, (needle,), no_run_folder=True))
    (t / "binary.csv").write_bytes(os.urandom(200))
    cases.append(Case("inspect binary csv", ["data", "inspect", str(t / "binary.csv")], True, ("cannot read CSV",)))
    d = images(t / "twolabels")
    shutil.copyfile(d / "a" / "a1.png", d / "b" / "copy.png")
    cases.append(Case("train same image under two labels", ["train", config(t, d)], True,
                      ("a1.png (a)", "copy.png (b)"), no_run_folder=True))
    cases.append(Case("train all-unreadable class", ["train", config(t, t / "allbad")], True,
                      ("no readable image",), no_run_folder=True))
    (t / "afile").write_text("x")
    sets = {"split.seed=-1": "split.seed", f"train.seed={2**70}": "train.seed", "augment.seed=-5": "augment.seed",
            "model.head.hidden=[0]": "model.head.hidden.0", "model.head.hidden=[-4]": "model.head.hidden.0",
            "name=../../escaped": "'name'", "name=a/b": "'name'",
            "evaluate.positive_classes=[nope]": "evaluate.positive_classes",
            f"output_dir={t / 'afile'}": "output_dir", f"train.cache_dir={t / 'afile'}/c": "train.cache_dir",
            "data.path=/dev/null": "/dev/null", "split.folds=1": "split.folds"}
    for s, needle in sets.items():
        cases.append(Case(f"train --set {s.replace(str(t), 'TMP')}", ["train", config(t, good), "--set", s], True,
                          (needle,), no_run_folder=True))
    if not quick:
        d = images(t / "skips", per_class=6)
        for i in range(4):
            (d / "a" / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
        (d / "empty_class").mkdir()
        cases.append(Case("train prints skipped files", ["train", config(t, d)], False,
                          ("4 file(s) skipped as unreadable", "broken0.png", "run.json", "'empty_class'")))
        # OTHER: the run's own 12 readable images, 3 new ones and a bomb header (RUN: the run trained above)
        other = t / "other"
        for f in sorted(d.rglob("*.png")):
            if not f.name.startswith("broken"):
                (other / f.parent.name).mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, other / f.parent.name / f.name)
        for i, f in enumerate(sorted((d / "b").glob("b*.png"))[:3]):
            Image.open(f).transpose(Image.Transpose.ROTATE_90).save(other / "b" / f"new{i}.png")
        (other / "a" / "bomb.png").write_bytes(png_header(30000, 30000))
        cases += [Case("evaluate --data half training images", ["evaluate", "RUN", "--data", str(other)], False,
                       ("12 of 15 images overlap the run's training", "clean remainder (3 images)", "bomb.png")),
                  Case("evaluate --data /dev/null", ["evaluate", "RUN", "--data", "/dev/null"], True,
                       ("not a regular file",)),
                  Case("evaluate --data unknown class", ["evaluate", "RUN", "--data", str(t / "allbad")], True,
                       ("not among the model's classes",))]
    return cases


def run_case(c: Case, t: Path) -> tuple[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "COLUMNS": "400",
           "OMP_NUM_THREADS": "1"}
    runs = t / "runs"
    before = set(runs.iterdir()) if runs.is_dir() else set()
    if "RUN" in c.args:  # the newest run folder, trained by an earlier case
        c.args = [str(max(before, key=lambda p: p.stat().st_mtime)) if a == "RUN" else a for a in c.args]
    try:
        p = subprocess.run([sys.executable, "-m", "oncotransfer.cli", *c.args], capture_output=True, text=True,
                           env=env, timeout=TIMEOUT, cwd=t)
    except subprocess.TimeoutExpired:
        return "hang", f"no answer in {TIMEOUT} s"
    out = p.stdout + p.stderr
    flat = " ".join(out.split())
    if "Traceback" in out:
        return "traceback", out.strip().splitlines()[-1][:100]
    if c.want_error and p.returncode == 0:
        return "silent", "exit 0 on bad input"
    if not c.want_error and p.returncode != 0:
        return "silent", f"failed ({p.returncode}): {flat[-100:]}"
    missing = [n for n in c.needles if n not in flat]
    if missing:
        return "silent", f"output does not name {missing}: {flat[-120:]}"
    after = set(runs.iterdir()) if runs.is_dir() else set()
    if c.no_run_folder and after - before:
        return "silent", f"left a run folder: {sorted(after - before)[0].name}"
    if (t.parent.parent / "escaped").exists() or list(t.parent.glob("*escaped")):
        return "silent", "wrote outside output_dir"
    return "ok", (p.stderr.strip().splitlines() or p.stdout.strip().splitlines() or [""])[-1][:100]


def main() -> int:
    quick = "--quick" in sys.argv
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp) / "w"
        t.mkdir()
        cases = build(t, quick)
        counts = {"ok": 0, "traceback": 0, "hang": 0, "silent": 0}
        t0 = time.time()
        only = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--only=")), None)
        if only:  # the evaluate cases score the run that "train prints skipped files" trains
            picked = [c for c in cases if only in c.name]
            needs_run = any("RUN" in c.args for c in picked)
            cases = [c for c in cases if c in picked or (needs_run and c.name == "train prints skipped files")]
        for c in cases:
            verdict, detail = run_case(c, t)
            counts[verdict] += 1
            print(f"{verdict:9s} | {c.name[:48]:48s} | {detail}", flush=True)
        print(f"\ncases {len(cases)}, tracebacks {counts['traceback']}, hangs {counts['hang']}, "
              f"silent wrong results {counts['silent']} ({time.time() - t0:.0f} s)")
        return 0 if counts["traceback"] + counts["hang"] + counts["silent"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
