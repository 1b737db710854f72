"""Whole-slide streaming: tiling + prediction of a >= 20,000 x 20,000 px pyramidal TIFF against the model's own
ONNX Runtime throughput, and peak memory.

    HF_HUB_OFFLINE=1 python benchmarks/slides.py [--side 20480] [--keep DIR]

1. A run: frozen offline EfficientNet-Lite0 (efficientnet_lite0_packaged) at 224 px on the built-in
   osteosarcoma tiles, one epoch (the weights do not change the speed).
2. A slide written tile by tile with tifffile (JPEG tiles of 256 px, 5 pyramid levels, 0.25 µm/px, i.e. a
   40x scan): the shared osteosarcoma tiles (../shared/data/osteosarcoma-tcia-60; the built-in ones if
   absent) at 1024 px cells, about 10% of the cells left as glass, so most tiles hold tissue.
3. In a fresh process (so its peak RSS is the pipeline's alone):
   - ``predict --slide`` streaming (``infer.slides.score_slide``: thumbnail, Otsu tissue mask, reader thread
     cutting 224 px tiles at 0.5 µm/px from level 1, ONNX Runtime on batches of 16, no PyTorch), tiles/s;
   - the reader alone (tiles cut and normalised, no model), tiles/s;
   - ONNX Runtime on the same tiles pre-loaded as normalised tensors, same batch size and session, tiles/s;
   - peak RSS while streaming (VmRSS sampled every 20 ms, and the process's VmHWM).
4. ``slides tile`` on the same slide (tiles written as PNG), tiles/s.

Targets (issue 11): streaming >= 80% of the ONNX Runtime throughput; peak memory < 2 GB.

    python benchmarks/slides.py --real [DIR]    (default ../shared/data/real-files/slides)

Every file under DIR (recursively) through ``slides tile`` one at a time, at the defaults (224 px tiles at
0.5 µm/px, auto tissue mask): which reader claims and opens it, the outcome (tiled, a one-line reason, or a
traceback: the target is none), tissue mode and fraction, tiles kept and tiles/s; and what ``find_slides`` makes
of the folder (a DICOM series is one slide). Target (issue 19): 0 tracebacks.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
SHARED = (ROOT / ".." / "shared" / "data" / "osteosarcoma-tcia-60").resolve()
sys.path.insert(0, str(ROOT / "tests"))  # slidegen: the tifffile slide writer the tests use
BATCH = 16  # what predict --slide uses: ORT's arena at batch 32 alone holds ~0.8 GB


def make_run(tmp: Path) -> Path:
    from oncotransfer.config import validate
    from oncotransfer.experiments.run import run_experiment
    cfg = validate({
        "name": "bench_slides", "output_dir": str(tmp / "runs"),
        "data": {"path": "demo:osteosarcoma", "image_size": 224},
        "split": {"kind": "holdout", "allow_image_level_split": True, "group_by_patient": False},
        "model": {"backbone": "efficientnet_lite0", "weights": "efficientnet_lite0_packaged", "freeze": "frozen"},
        "train": {"epochs": 1, "cache_dir": str(tmp / "cache"), "num_workers": 1},
        "evaluate": {"bootstrap": 0},
    }, "benchmark")
    return run_experiment(cfg, report=False).run_dir


def make_slide(path: Path, side: int) -> tuple[Path, float]:
    from PIL import Image
    from slidegen import Mosaic, stain_images, write_slide
    files = sorted(SHARED.rglob("*.jpg")) if SHARED.is_dir() else []
    if not files:
        files = sorted((ROOT / "src" / "oncotransfer" / "data" / "demo" / "osteosarcoma").rglob("*.jpg"))
    images = [np.asarray(Image.open(f).convert("RGB").resize((1024, 1024))) for f in files[:40]] or stain_images(8, 1024)
    cells = -(-side // 1024)
    rng = np.random.default_rng(0)
    layout = rng.integers(0, len(images), size=(cells, cells))
    layout[rng.random(layout.shape) < 0.1] = -1
    t = time.perf_counter()
    write_slide(path, Mosaic(images, layout, 1024), side, side, mpp=0.25, levels=5, compression="jpeg")
    return path, time.perf_counter() - t


class PeakRSS:
    """Highest VmRSS seen, sampled every 20 ms in a thread."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now(key: str = "VmRSS:") -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.02)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.now())


def measure(run: Path, slide: Path, baseline_tiles: int) -> dict:
    """Child process: streaming, reader-only and ORT-only throughput (ORT measured before and after the
    streaming run, as the load of a shared machine drifts), peak memory while streaming."""
    import gc
    import cv2  # noqa: F401 - the one-off import of the tissue detection is not throughput
    from oncotransfer.data import slides as S
    from oncotransfer.infer.slides import prefetch, score_slide, tile_model
    pred = tile_model(run)  # RUN/export/model.onnx, exported by the parent
    pred.probabilities(pred.normalised(np.zeros((BATCH, pred.size, pred.size, 3), np.uint8)))
    s = S.open_slide(slide)
    geom = S.plan(s, slide, 224, 0.5)
    first = S.tissue_tiles(geom, S.tissue_mask(S.thumbnail(s))[0], 0.5)[:baseline_tiles]

    def ort_alone() -> tuple[float, int]:
        pre = [pred.normalised(arr) for _, arr in S.iter_tiles(s, geom, first, BATCH)]
        t = time.perf_counter()
        for x in pre:
            pred.probabilities(x)
        return time.perf_counter() - t, sum(len(x) for x in pre)
    ort1 = ort_alone()
    gc.collect()
    out = {"ort_threads": pred.session.get_session_options().intra_op_num_threads, "rss_start": PeakRSS.now(),
           "torch_loaded": "torch" in sys.modules}
    with PeakRSS() as rss:
        t = time.perf_counter()
        df, probs, geom, _ = score_slide(pred, slide, 224, 0.5, None, None, 0.5, BATCH)
        out["stream_s"] = time.perf_counter() - t
    # VmHWM: this process image's peak RSS (ru_maxrss would carry the parent's peak over fork + exec).
    out.update(tiles=len(df), grid=geom.grid()[0] * geom.grid()[1], level=geom.level, read=geom.read,
               rss_peak=rss.peak, maxrss=PeakRSS.now("VmHWM:"))
    coords = list(zip(df.x, df.y, df.tissue))
    t = time.perf_counter()
    n = 0
    for part, arr in prefetch(S.iter_tiles(s, geom, coords, BATCH)):
        pred.normalised(arr)
        n += len(part)
    out["reader_s"], out["reader_tiles"] = time.perf_counter() - t, n
    ort2 = ort_alone()
    out["ort_rates"] = [ort1[1] / ort1[0], ort2[1] / ort2[0]]
    out["ort_s"], out["ort_tiles"] = ort1[0] + ort2[0], ort1[1] + ort2[1]
    return out


def real_files(folder: Path, tile_size: int = 224, mpp: float | None = None, mpp_source: float | None = None) -> int:
    """The --real table; returns the number of tracebacks."""
    import traceback
    from oncotransfer.data import slides as S
    from oncotransfer.data.readers.base import read_head
    from oncotransfer.data.readers.slide import SlideReader
    from oncotransfer.errors import OncoError
    skipped: dict[str, str] = {}
    listed = {str(f) for f in S.find_slides(folder, skipped)}
    rows, tracebacks = [], 0
    with tempfile.TemporaryDirectory(prefix="bench_real_") as tmp:
        for k, f in enumerate(sorted(p for p in folder.rglob("*") if p.is_file())):
            claimed = SlideReader().claims(f, read_head(f, 1024))
            try:
                slide = S.open_slide(f)
                opened = f"{type(slide).__module__.split('.')[0]} ({slide.properties.get('openslide.vendor', '?')})"
                slide.close()
            except OncoError:
                opened = "-"
            except Exception:  # noqa: BLE001 - counted: a traceback is what this table hunts
                opened = "traceback"
            mode = frac = kept = rate = "-"
            t = time.perf_counter()
            try:
                r = S.tile_slides(f, Path(tmp) / str(k), tile_size, mpp, mpp_source=mpp_source)
                info = r.slides[0]
                rate = f"{info['tiles'] / (time.perf_counter() - t):.1f}"
                outcome, mode, frac = "tiled", info["tissue"], f"{info['tissue_fraction']:.3f}"
                kept = f"{info['tiles']} / {info['grid_tiles']}"
            except OncoError as e:
                outcome = "error: " + str(e).replace(f"{f}: ", "").replace("|", "/")[:90]
            except Exception:  # noqa: BLE001
                tracebacks += 1
                outcome = "TRACEBACK " + traceback.format_exc().strip().splitlines()[-1][:100]
            folder_says = "slide" if str(f) in listed else "skipped: " + skipped.get(str(f), "not a slide")[:28]
            rows.append((str(f.relative_to(folder)), f"{'slide' if claimed else 'other'} / {opened}", outcome, mode,
                         frac, kept, rate, folder_says))
    at = f"{tile_size} px at {mpp or 0.5:g} µm/px" + (f", --mpp-source {mpp_source:g}" if mpp_source else "")
    head = ("file", "claims / opened by", f"outcome ({at})", "tissue", "fraction", "tiles kept",
            "tiles/s", "find_slides on the folder")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(f"{str(v):<{w}}" for v, w in zip(r, widths)))
    print(f"\n{len(rows)} files, {tracebacks} traceback(s) (target 0)")
    return tracebacks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--side", type=int, default=20480, help="slide width = height in px (level 0)")
    ap.add_argument("--baseline-tiles", type=int, default=512, help="pre-loaded tiles for the ORT-only figure")
    ap.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    ap.add_argument("--measure", nargs=2, metavar=("RUN", "SLIDE"), help=argparse.SUPPRESS)
    ap.add_argument("--tile-size", type=int, default=224, help="--real: tile px")
    ap.add_argument("--mpp", type=float, default=None, help="--real: tile µm/px (default 0.5)")
    ap.add_argument("--mpp-source", type=float, default=None, help="--real: level-0 µm/px for every file")
    ap.add_argument("--real", nargs="?", type=Path, const=ROOT.parent / "shared" / "data" / "real-files" / "slides",
                    help="table of every file under this folder through `slides tile` (real scanners' files)")
    args = ap.parse_args()
    if args.real:
        sys.exit(1 if real_files(args.real.resolve(), args.tile_size, args.mpp, args.mpp_source) else 0)
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), Path(args.measure[1]), args.baseline_tiles)))
        return
    tmpdir = None if args.keep else tempfile.TemporaryDirectory(prefix="bench_slides_")
    tmp = Path(args.keep or tmpdir.name)
    tmp.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    run = make_run(tmp)
    from oncotransfer.infer.export import export_run
    export_run(run, "onnx")  # here, so the child's memory is the pipeline's, not the exporter's
    print(f"run trained and exported in {time.perf_counter() - t:.0f} s: {run}", flush=True)
    slide, write_s = make_slide(tmp / "bench.tif", args.side)
    print(f"slide {args.side} x {args.side} px written in {write_s:.0f} s ({slide.stat().st_size / 2**20:.0f} MiB)",
          flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    child = subprocess.run([sys.executable, __file__, "--measure", str(run), str(slide),
                            "--baseline-tiles", str(args.baseline_tiles)], env=env, capture_output=True, text=True)
    if child.returncode:
        sys.exit(child.stderr[-3000:])
    m = json.loads(child.stdout.strip().splitlines()[-1])
    from oncotransfer.data.slides import tile_slides
    t = time.perf_counter()
    tiled = tile_slides(slide, tmp / "tiles", tile_size=224, mpp=0.5)
    tile_s = time.perf_counter() - t
    stream, reader, ort = m["tiles"] / m["stream_s"], m["reader_tiles"] / m["reader_s"], m["ort_tiles"] / m["ort_s"]
    gib = 2 ** 30
    rows = [
        ("slide", f"{args.side} x {args.side} px, 0.25 µm/px, 5 levels; tiles 224 px at 0.5 µm/px from level "
                  f"{m['level']} ({m['read']} px reads)"),
        ("tissue tiles / grid", f"{m['tiles']} / {m['grid']}"),
        ("predict --slide streaming", f"{stream:.1f} tiles/s ({m['stream_s']:.1f} s, incl. thumbnail + tissue mask)"),
        ("reader alone (cut + normalise)", f"{reader:.1f} tiles/s"),
        (f"ONNX Runtime on {m['ort_tiles'] // 2} pre-loaded tiles", f"{ort:.1f} tiles/s (batch {BATCH}, "
                                                                    f"{m['ort_threads']} intra-op threads; "
                                                                    f"{m['ort_rates'][0]:.1f} before, "
                                                                    f"{m['ort_rates'][1]:.1f} after streaming)"),
        ("streaming / ORT", f"{stream / ort:.0%} (target >= 80%)"),
        ("peak RSS while streaming", f"{m['rss_peak'] / gib:.2f} GiB sampled, {m['maxrss'] / gib:.2f} GiB VmHWM "
                                     f"(start {m['rss_start'] / gib:.2f} GiB, torch "
                                     f"{'loaded' if m['torch_loaded'] else 'not loaded'}; target < 2 GB)"),
        ("slides tile (PNG tiles written)", f"{len(tiled.slides) and tiled.slides[0]['tiles']} tiles in "
                                            f"{tile_s:.1f} s = {tiled.slides[0]['tiles'] / tile_s:.1f} tiles/s"),
        ("CPU", f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end"),
    ]
    width = max(len(r[0]) for r in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    ok = stream / ort >= 0.8 and max(m["rss_peak"], m["maxrss"]) < 2e9
    print("\ntargets met" if ok else "\ntargets NOT met")
    if tmpdir:
        tmpdir.cleanup()


if __name__ == "__main__":
    main()
