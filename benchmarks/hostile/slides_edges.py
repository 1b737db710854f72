"""Damaged slides and slide tables through ``slides tile`` and ``predict --slide``, and Ctrl-C to ``grid`` at
moments of its start (issue 22): a corrupt tile at level 0 or in the thumbnail level, truncated TIFFs, IFD
chains that loop, labels CSVs naming absent slides, with conflicting rows or empty cells, a damaged
tiling.json. Each is one line naming the damage (or, in a folder, the slide named and the others done)."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np

from core import ROOT, Case

sys.path.insert(0, str(ROOT / "tests"))
from slidedamage import corrupt_tile, ifd_loop, truncate  # noqa: E402
from slidegen import Mosaic, stain_images, write_slide  # noqa: E402

F = "slides_edges"
CUTS = (0.02, 0.3, 0.6, 0.9, 0.999)


def _slide(path: Path, seed: int) -> Path:
    """4608 x 512 px of tissue at 0.25 µm/px, two levels: tiles at 0.25 µm/px come from level 0 and the
    thumbnail from level 1, the lowest."""
    m = Mosaic(stain_images(4, 512, seed=seed), np.array([[0, 1, 2, 3, 0, 1, 2, 3, 0]]), 512)
    h, w = m.shape
    return write_slide(path, m, w, h, mpp=0.25, levels=2)


def _damaged(good: Path, path: Path, damage) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(good, path)
    damage(path)
    return path


def _tiles_of(out: Path, slide: str, want: int):
    def check(r, t):
        import pandas as pd
        m = out / "manifest.csv"
        n = int((pd.read_csv(m)["slide"] == slide).sum()) if m.is_file() else 0
        return None if n == want else ("silent", f"{want} tiles of {slide} expected in {m}, found {n}")
    return check


def _predict(t: Path, *args: str) -> list[str]:
    """``predict RUN ... --slide`` on the run trained by the first cases (found when the case runs)."""
    run = f"$(dirname $(ls -d {t}/run/*/checkpoint | head -1))"
    quoted = " ".join(f"'{a}'" for a in args)
    return ["bash", "-c", f"exec '{sys.executable}' -m oncotransfer.cli predict {run} {quoted} --slide "
                          f"--out '{t}/pred.csv'"]


GRID_SIGINT = r"""
import os, signal, subprocess, sys, time
from pathlib import Path
grid, delay, marker = sys.argv[1], float(sys.argv[2]), sys.argv[3]
def shell():
    signal.signal(signal.SIGINT, signal.SIG_DFL); signal.pthread_sigmask(signal.SIG_SETMASK, [])
p = subprocess.Popen([sys.executable, "-m", "oncotransfer.cli", "grid", grid, "--workers", "2"],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=shell)
def children():
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == p.pid:
                out.append(int(d.name))
        except (OSError, ValueError, IndexError):
            pass
    return out
end = time.time() + 120
while marker == "pool" and not children() and p.poll() is None and time.time() < end:
    time.sleep(0.05)
time.sleep(delay)
os.killpg(p.pid, signal.SIGINT)
out = p.communicate(timeout=120)[0].decode(errors="replace")
time.sleep(2)
alive = [pid for pid in children()]
print(out + f"\ngrid exit {p.returncode}" + (f"; processes left: {alive}" if alive else ""))
sys.exit(1 if alive else (0 if p.returncode == 0 else 3))
"""


def _grid(t: Path) -> Path:
    import yaml
    base = {"name": "sig", "data": {"path": "demo:osteosarcoma", "image_size": 32},
            "split": {"kind": "holdout", "test_size": 0.25, "val_size": 0.0, "group_by_patient": False,
                      "allow_image_level_split": True, "seed": 0},
            "model": {"backbone": "efficientnet_lite0", "weights": "efficientnet_lite0_packaged", "freeze": "frozen"},
            "train": {"epochs": 1, "batch_size": 16, "seed": 0, "feature_engine": "torch",
                      "cache_dir": str(t / "gcache"), "num_workers": 1}, "evaluate": {"bootstrap": 0}}
    p = t / "grid.yaml"
    p.write_text(yaml.safe_dump({"name": "sig", "base": base, "grid": {"train.lr": [0.01, 0.001, 0.0001]},
                                 "output_dir": str(t / "gout")}))
    return p


def build(t: Path) -> list[Case]:
    src = t / "train_slides"
    src.mkdir(parents=True)
    good, other = _slide(src / "s_a.tif", 0), _slide(src / "s_b.tif", 1)
    (t / "labels.csv").write_text("slide,label\ns_a,a\ns_b,b\n")
    cfg = t / "train.yaml"
    cfg.write_text(f"name: edges\ndata: {{path: '{t / 'tiles' / 'manifest.csv'}', image_size: 32}}\n"
                   f"output_dir: '{t / 'run'}'\nsplit: {{kind: holdout, test_size: 0.3, val_size: 0.0, "
                   "group_by_patient: false, allow_image_level_split: true}\n"
                   "model: {backbone: efficientnet_lite0, weights: efficientnet_lite0_packaged, freeze: frozen}\n"
                   f"train: {{epochs: 1, batch_size: 8, cache_dir: '{t / 'cache'}', num_workers: 0}}\n"
                   "evaluate: {bootstrap: 0}\n")
    mpp = ["--mpp", "0.25", "--tile-size", "256"]
    cases = [Case(F, "tile two good slides with labels", ["slides", "tile", str(src), str(t / "tiles"), *mpp,
                                                          "--labels", str(t / "labels.csv")], False,
                  check=_tiles_of(t / "tiles", "s_a", 36)),
             Case(F, "train on their tiles", ["train", str(cfg)], False, timeout=400)]
    bad = t / "bad"
    one = {"level-0 tile": _damaged(good, bad / "tile0.tif", lambda p: corrupt_tile(p, 0, 5)),
           "thumbnail-level tile": _damaged(good, bad / "thumb.tif", lambda p: corrupt_tile(p, -1, 2)),
           "IFD loop to IFD 0": _damaged(good, bad / "loop0.tif", lambda p: ifd_loop(p, 0)),
           "IFD loop to IFD 1": _damaged(good, bad / "loop1.tif", lambda p: ifd_loop(p, 1))}
    for cut in CUTS:
        one[f"truncated at {cut:.1%}"] = _damaged(good, bad / f"cut{int(cut * 1000)}.tif", lambda p, c=cut: truncate(p, c))
    needle = {"level-0 tile": "cannot read the tile at (", "thumbnail-level tile": "cannot read its thumbnail",
              "IFD loop to IFD 0": "loops back to IFD 0", "IFD loop to IFD 1": "loops back to IFD 1"}
    for what, path in one.items():
        want = (path.name, needle.get(what, ""))
        cases.append(Case(F, f"tile: {what}", ["slides", "tile", str(path), str(t / f"o_{path.stem}"), *mpp], True,
                          want))
        cases.append(Case(F, f"predict --slide: {what}", [], True, want, cmd=_predict(t, str(path), *mpp[:2])))
    for what in ("level-0 tile", "thumbnail-level tile"):  # in a folder: that slide named, the other done
        d = t / f"mixed_{what[:5]}"
        d.mkdir()
        shutil.copy(one[what], d / one[what].name)
        shutil.copy(other, d / "fine.tif")
        cases.append(Case(F, f"tile folder: {what} + a good slide", ["slides", "tile", str(d), str(d / "out"), *mpp],
                          True, (f"failed: {d / one[what].name}", needle[what], "36 tiles from 1 slide"),
                          check=_tiles_of(d / "out", "fine", 36)))
        cases.append(Case(F, f"predict folder: {what} + a good slide", [], True,
                          (one[what].name, needle[what], "fine.tif: 36 tiles", "1 input(s) failed"),
                          cmd=_predict(t, str(d), *mpp[:2])))
    d = t / "mixed_loop"
    d.mkdir()
    shutil.copy(one["IFD loop to IFD 0"], d / "loop0.tif")
    shutil.copy(other, d / "fine.tif")
    # a loop after two IFDs still reads as a pyramid: the slide fails by name (one found flat is skipped by name)
    cases.append(Case(F, "tile folder: IFD loop named + a good slide", ["slides", "tile", str(d),
                      str(d / "out"), *mpp], True, ("loop0.tif", "loops back", "36 tiles from 1 slide"),
                      check=_tiles_of(d / "out", "fine", 36)))
    for name, csv, want in [
            ("labels name absent slides", "slide,label\ns_a,a\ns_b,b\nghost,a\n", ("['ghost'] are not in",)),
            ("labels: conflicting duplicate rows", "slide,label\ns_a,a\ns_b,b\ns_a.tif,b\n",
             ("lines 2 and 4", "'s_a'", "conflicting")),
            ("labels: empty label cells", "slide,label\ns_a,\ns_b,b\n", ("empty slide or label cell", "line(s) 2")),
            ("labels: empty slide cell", "slide,label\ns_a,a\ns_b,b\n,b\n", ("line(s) 4",)),
            ("labels: identical duplicate rows (fine)", "slide,label\ns_a,a\ns_b,b\ns_a,a\n", ())]:
        f = t / f"{name.split(':')[-1].strip().replace(' ', '_')}.csv"
        f.write_text(csv)
        cases.append(Case(F, f"tile {name}", ["slides", "tile", str(src), str(t / f"o_{f.stem}"), *mpp,
                                              "--labels", str(f)], not want == (), (str(f.name), *want) if want
                          else ()))
    tiling = t / "tiles" / "tiling.json"
    for name, text, want in [("not JSON", "{\"tile_size\": 64,", "damaged tiling.json"),
                             ("tile_size a string", '{"tile_size": "64"}', "tile_size is '64'"),
                             ("negative mpp", '{"tile_size": 64, "mpp": -1}', "mpp is -1"),
                             ("min_tissue 7", '{"tile_size": 64, "min_tissue": 7}', "min_tissue is 7"),
                             ("a list", "[]", "not an object")]:
        cases.append(Case(F, f"predict --slide, tiling.json {name}", [], True, ("tiling.json", want),
                          cmd=_predict(t, str(good)), setup=lambda text=text: tiling.write_text(text)))
    grid = _grid(t)
    for moment, marker, delay in [("while the CLI loads", "now", 0.3), ("as the pool starts", "pool", 0.0),
                                  ("1 s into the pool's start", "pool", 1.0), ("while runs train", "pool", 8.0)]:
        cases.append(Case(F, f"grid Ctrl-C {moment}", [], True, ("interrupted",), timeout=300,
                          cmd=[sys.executable, "-c", GRID_SIGINT, str(grid), str(delay), marker]))
    return cases
