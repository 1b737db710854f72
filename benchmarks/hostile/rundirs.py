"""Hostile family ``rundirs`` (issue 22): damaged run directories and caches.

One tiny run is trained (3 folds, exported) and copied for every case, then one file is damaged: fold and model
files cut short, garbled, swapped with another fold's or another run's; meta.json / model.json / ood.json with
garbage values (temperatures 0, NaN, negative); a damaged model.onnx; split.csv and predictions.csv with garbage
cells. ``predict``, ``evaluate``, ``export`` and ``serve`` must refuse in one line naming the damaged file and how
to rebuild it. Also: labels ``NA``/``null`` (strings, not missing values), and damaged feature/activation caches
(recomputed with a warning; never a file touched outside the cache).
"""
from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from faults_ingest import images  # noqa: E402
from hostile.core import Case, Result  # noqa: E402

FAM = "rundirs"
_port = [18600]


def _cfg(t: Path, name: str, data: Path, out: Path, folds: int = 3, extra: str = "", model: str = "") -> str:
    p = t / f"{name}.yaml"
    p.write_text(f"name: {name}\ndata: {{path: '{data}', image_size: 32}}\noutput_dir: '{out}'\n"
                 f"split: {{kind: kfold, folds: {folds}, group_by_patient: false, allow_image_level_split: true}}\n"
                 + (model or "model: {backbone: efficientnet_lite0, weights: efficientnet_lite0_packaged, "
                             "freeze: frozen}\n")
                 + f"train: {{epochs: 2, batch_size: 4, cache_dir: '{t / 'cache'}', num_workers: 0}}\n"
                   "evaluate: {bootstrap: 0}\n" + extra)
    return str(p)


def _run(folder: Path) -> Path:
    return next(p for p in sorted(folder.iterdir()) if (p / "checkpoint").is_dir())


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")


def _cut(rel: str, keep: float | int) -> Callable[[Path], None]:
    def f(run: Path) -> None:
        data = (run / rel).read_bytes()
        n = int(len(data) * keep) if isinstance(keep, float) else keep
        (run / rel).write_bytes(data[:n])
    return f


def _flip(rel: str, at: float = 0.7) -> Callable[[Path], None]:
    def f(run: Path) -> None:
        data = bytearray((run / rel).read_bytes())
        i = int(len(data) * at)
        data[i] ^= 0xFF
        (run / rel).write_bytes(bytes(data))
    return f


def _garbage(rel: str, data: bytes = b"\x00garbage\xff" * 50) -> Callable[[Path], None]:
    return lambda run: (run / rel).write_bytes(data)


def _copy_from(rel: str, src: Callable[[], Path]) -> Callable[[Path], None]:
    return lambda run: shutil.copyfile(src(), run / rel)


def _edit_json(rel: str, edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def f(run: Path) -> None:
        d = json.loads((run / rel).read_text())
        out = edit(d)
        (run / rel).write_text(json.dumps(d if out is None else out, allow_nan=True))
    return f


def _set(*keys, value) -> Callable[[dict], None]:
    def f(d: dict) -> None:
        for k in keys[:-1]:
            d = d[k]
        d[keys[-1]] = value
    return f


def _edit_csv(rel: str, edit: Callable[[list[list[str]]], None]) -> Callable[[Path], None]:
    def f(run: Path) -> None:
        import csv
        rows = list(csv.reader((run / rel).open()))
        edit(rows)
        with (run / rel).open("w", newline="") as fh:
            csv.writer(fh).writerows(rows)
    return f


def _cell(column: str, value: str, row: int = 1) -> Callable[[list[list[str]]], None]:
    def f(rows: list[list[str]]) -> None:
        rows[row][rows[0].index(column)] = value
    return f


def build(t: Path) -> list[Case]:
    data = images(t / "data", per_class=8)
    other = images(t / "other_data", per_class=4, classes=("a", "b", "c"))
    img = str(data / "a" / "a0.png")
    base = lambda: _run(t / "base")  # noqa: E731
    oth = lambda: _run(t / "other")  # noqa: E731
    cases = [Case(FAM, "train base run (3 folds)", ["train", _cfg(t, "base", data, t / "base")], False, timeout=300),
             Case(FAM, "train other run (3 classes)", ["train", _cfg(t, "other", other, t / "other", 2)], False,
                  timeout=300),
             Case(FAM, "train export base", ["export", str(t / "base")], False, timeout=300,
                  cmd=[sys.executable, "-c", "import sys,pathlib,subprocess; r=[p for p in sorted(pathlib.Path("
                       f"{str(t / 'base')!r}).iterdir())][0]; sys.exit(subprocess.call([sys.executable, '-m', "
                       "'oncotransfer.cli', 'export', str(r)]))"])]

    def damaged(name: str, damage: Callable[[Path], None], needles: tuple[str, ...],
                commands: tuple[str, ...] = ("predict", "evaluate", "export", "serve")) -> None:
        for cmd in commands:
            dest = t / "d" / _slug(f"{name} {cmd}")

            def setup(dest: Path = dest) -> None:
                shutil.rmtree(dest, ignore_errors=True)
                shutil.copytree(base(), dest)
                damage(dest)
            args = {"predict": ["predict", str(dest), img, "--out", str(dest / "p.csv")],
                    "onnx": ["predict", str(dest), img, "--out", str(dest / "p.csv"), "--engine", "onnx"],
                    "evaluate": ["evaluate", str(dest), "--data", str(data)],
                    "recompute": ["evaluate", str(dest)],
                    "export": ["export", str(dest)],
                    "serve": ["serve", str(dest), "--port", str(_port[0])]}[cmd]
            _port[0] += 1
            cases.append(Case(FAM, f"{name}: {cmd}", args, True, needles, setup=setup,
                              timeout=45 if cmd == "serve" else 120))

    fold1, fold2, model = "checkpoint/folds/fold1.safetensors", "checkpoint/folds/fold2.safetensors", \
        "checkpoint/model.safetensors"
    retrain = "retrain"
    for rel, short in ((fold1, "fold1.safetensors"), (model, "model.safetensors")):
        damaged(f"{short} cut to half", _cut(rel, 0.5), (short, retrain))
        damaged(f"{short} cut to 8 bytes", _cut(rel, 8), (short, retrain), ("serve",))
        damaged(f"{short} empty", _cut(rel, 0), (short, retrain), ("export",))
        damaged(f"{short} garbage", _garbage(rel), (short, retrain), ("predict", "evaluate"))
        damaged(f"{short} one byte flipped", _flip(rel), (short, retrain), ("predict", "serve"))
        damaged(f"{short} from a run with other classes", _copy_from(rel, lambda rel=rel: oth() / rel),
                (short, retrain))
    damaged("fold2 replaced by fold1 (one model twice)", _copy_from(fold2, lambda: base() / fold1),
            ("fold2.safetensors",))
    damaged("fold1 replaced by model.safetensors", _copy_from(fold1, lambda: base() / model),
            ("fold1.safetensors",), ("predict", "export"))
    damaged("fold1 missing", lambda r: (r / fold1).unlink(), ("fold1.safetensors",), ("predict", "serve"))

    meta = "checkpoint/meta.json"
    for label, edit in [("temperature 0", _set("folds", 0, "temperature", value=0.0)),
                        ("temperature NaN", _set("folds", 1, "temperature", value=float("nan"))),
                        ("temperature negative", _set("folds", 2, "temperature", value=-1.0)),
                        ("temperature infinite", _set("folds", 0, "temperature", value=float("inf"))),
                        ("temperature a string", _set("folds", 0, "temperature", value="hot")),
                        ("top temperature 0", _set("temperature", value=0.0)),
                        ("fold file climbs out", _set("folds", 1, "file", value="../../../etc/passwd")),
                        ("fold file absolute", _set("folds", 1, "file", value="/etc/passwd")),
                        ("two folds one file", _set("folds", 2, "file", value="folds/fold1.safetensors")),
                        ("folds empty", _set("folds", value=[])),
                        ("folds a string", _set("folds", value="all")),
                        ("fold sha256 garbage", _set("folds", 1, "sha256", value="zz")),
                        ("classes empty", _set("classes", value=[])),
                        ("classes duplicated", _set("classes", value=["a", "a"])),
                        ("classes three", _set("classes", value=["a", "b", "c"])),
                        ("size 0", _set("preprocessing", "size", value=0)),
                        ("size a string", _set("preprocessing", "size", value="big")),
                        ("std 0", _set("preprocessing", "std", value=[0, 0, 0])),
                        ("mean two values", _set("preprocessing", "mean", value=[0.5, 0.5])),
                        ("head garbage", _set("head", value={"kind": 7, "hidden": "x"})),
                        ("backbone unknown", _set("backbone", "name", value="no_such_net")),
                        ("meta a list", lambda d: [1, 2])]:
        damaged(f"meta.json {label}", _edit_json(meta, edit), ("meta.json",),
                ("predict", "serve") if "temperature" in label else ("predict",))
    damaged("meta.json garbage bytes", _garbage(meta), ("meta.json",), ("predict", "evaluate", "export"))

    ood = "checkpoint/ood.json"
    damaged("ood.json garbage", _garbage(ood), ("ood.json",), ("predict", "serve"))
    damaged("ood.json threshold NaN", _edit_json(ood, _set("members", 0, "threshold", value=float("nan"))),
            ("ood.json",), ("predict",))
    damaged("ood.safetensors cut", _cut("checkpoint/ood.safetensors", 0.5), ("ood.safetensors",), ("predict",))

    onnx, mj = "export/model.onnx", "export/model.json"
    damaged("model.onnx cut to half", _cut(onnx, 0.5), ("model.onnx", "export"), ("predict", "onnx", "serve"))
    damaged("model.onnx garbage", _garbage(onnx), ("model.onnx", "export"), ("predict", "onnx"))
    damaged("model.onnx empty", _cut(onnx, 0), ("model.onnx", "export"), ("predict", "serve"))
    damaged("model.json garbage", _garbage(mj), ("model.json", "export"), ("predict", "onnx", "serve"))
    damaged("model.json a list", _edit_json(mj, lambda d: [d]), ("model.json",), ("predict", "onnx"))
    damaged("model.json members garbage", _edit_json(mj, _set("members", value=[{"fold": "x"}])),
            ("model.json",), ("predict", "onnx"))
    damaged("model.json member temperature 0", _edit_json(mj, _set("members", 0, "temperature", value=0)),
            ("model.json",), ("predict", "onnx"))
    damaged("model.json sha256 of another file", _edit_json(mj, _set("sha256", value="0" * 64)),
            ("model.onnx",), ("predict", "onnx", "serve"))

    damaged("run.json temperatures NaN", _edit_json("run.json", _set("temperatures", "0", value=float("nan"))),
            ("run.json",), ("recompute",))
    damaged("run.json garbage", _garbage("run.json"), ("run.json",), ("recompute",))
    for label, edit in [("prob garbage", _cell("prob_a", "abc")), ("prob NaN", _cell("prob_b", "nan")),
                        ("label empty", _cell("label", "")), ("label unknown", _cell("label", "zebra")),
                        ("fold garbage", _cell("fold", "x")), ("pred unknown", _cell("pred", "zebra")),
                        ("column missing", lambda rows: [r.pop(rows[0].index("prob_a")) for r in rows[::-1]])]:
        damaged(f"predictions.csv {label}", _edit_csv("predictions.csv", edit), ("predictions.csv",), ("recompute",))
    damaged("predictions.csv garbage bytes", _garbage("predictions.csv"), ("predictions.csv",), ("recompute",))
    damaged("predictions.csv empty", _cut("predictions.csv", 0), ("predictions.csv",), ("recompute",))
    for label, edit in [("sha256 garbage", _cell("sha256", "not-a-hash")), ("phash garbage", _cell("phash", "zz"))]:
        damaged(f"split.csv {label}", _edit_csv("split.csv", edit), ("split.csv",), ("evaluate",))
    damaged("split.csv garbage bytes", _garbage("split.csv"), ("split.csv",), ("evaluate", "export"))
    damaged("split.csv missing", lambda r: (r / "split.csv").unlink(), ("split.csv",), ("evaluate",))

    # labels that pandas reads as missing values by default: strings here, trained and evaluated to the end
    for word in ("NA", "null"):
        d = t / f"labels_{word}"
        rows = []
        for c in ("a", "b"):
            for i in range(6):
                rows.append(f"{c}/{c}{i}.png,{word if c == 'a' else 'b'}")
        images(d, per_class=6)
        (d / "manifest.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
        cases.append(Case(FAM, f"labels {word} train to the end", ["train", _cfg(t, f"na_{word}", d / "manifest.csv",
                          t / "runs", 2)], False, timeout=300, check=_finished_with(word)))
    cases += _cache_cases(t, data)
    return cases


def _finished_with(word: str):
    def check(r: Result, t: Path) -> tuple[str, str] | None:
        runs = [p for p in (t / "runs").iterdir() if p.name.endswith(f"na_{word}")] if (t / "runs").is_dir() else []
        if not runs or not (runs[-1] / "metrics.json").is_file() or not (runs[-1] / "report.md").is_file():
            return "lost", "no metrics.json / report.md"
        if word not in json.loads((runs[-1] / "metrics.json").read_text()).get("classes", []):
            return "silent", f"class {word!r} not in metrics.json"
        return None
    return check


def _cache_cases(t: Path, data: Path) -> list[Case]:
    """Damaged feature- and activation-cache entries: recomputed with a warning, never trusted, never a file
    outside the cache touched."""
    cases = []
    tail = "model: {backbone: efficientnet_lite0, weights: efficientnet_lite0_packaged, freeze: 'last:1'}\n"
    victim = t / "victim.txt"

    def act_index(cache: Path) -> list[Path]:
        return [p for p in cache.rglob("*.json")]

    def damage_act(label: str, fn: Callable[[dict, Path], None]) -> Case:
        cache = t / "cache_act" / _slug(label)
        cfg = _cfg(t, "act_" + _slug(label), data, t / "runs_act", 2, model=tail)
        Path(cfg).write_text(Path(cfg).read_text().replace(f"cache_dir: '{t / 'cache'}'", f"cache_dir: '{cache}'"))

        def setup() -> None:
            src = t / "cache_act" / "_base"
            shutil.rmtree(cache, ignore_errors=True)
            shutil.copytree(src, cache)
            victim.write_text("keep me")
            for ix in act_index(cache):
                info = json.loads(ix.read_text())
                if not fn(info, ix):
                    ix.write_text(json.dumps(info))

        def check(r: Result, _t: Path) -> tuple[str, str] | None:
            if not victim.is_file():
                return "security", f"the cache rewrite deleted {victim} outside the cache"
            if "warning" not in r.out.lower() or "cache" not in r.out.lower():
                return "silent", "damaged cache entry used without a warning"
            return None
        return Case(FAM, f"activation cache {label}", ["train", cfg], False, setup=setup, check=check, timeout=300)

    base_cfg = _cfg(t, "act_base", data, t / "runs_act", 2, model=tail)
    Path(base_cfg).write_text(Path(base_cfg).read_text().replace(f"cache_dir: '{t / 'cache'}'",
                                                                 f"cache_dir: '{t / 'cache_act' / '_base'}'"))
    cases.append(Case(FAM, "train activation-cache base", ["train", base_cfg], False, timeout=300))

    def rel_file(info: dict, ix: Path) -> None:
        info["file"] = str(Path("..") / ".." / ".." / ".." / victim.relative_to(t))

    def swap(info: dict, ix: Path) -> None:
        info["shas"] = info["shas"][::-1]

    def zero(info: dict, ix: Path) -> None:
        arr = np.load(ix.parent / info["file"])
        np.save(ix.parent / info["file"], np.zeros_like(arr))

    def nan(info: dict, ix: Path) -> None:
        arr = np.load(ix.parent / info["file"])
        np.save(ix.parent / info["file"], np.full_like(arr, np.nan))

    def shape(info: dict, ix: Path) -> None:
        arr = np.load(ix.parent / info["file"])
        np.save(ix.parent / info["file"], arr.reshape(len(arr), -1)[:, :7].copy())

    def null(info: dict, ix: Path) -> bool:
        ix.write_text("null")
        return True  # written as it is

    def absolute(info: dict, ix: Path) -> None:
        info["file"] = str(victim)

    for label, fn in [("index file climbs out", rel_file), ("index file absolute", absolute),
                      ("rows swapped", swap), ("arrays zeroed", zero), ("arrays NaN", nan),
                      ("array wrong shape", shape), ("index null", null)]:
        cases.append(damage_act(label, fn))
    return cases
