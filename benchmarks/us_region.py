"""Ultrasound image regions: what ``data.us_region: auto`` crops off real objects, and what a model learns from
burned-in annotation when it does not.

    python benchmarks/us_region.py [--work /tmp/us_region] [--skip-train] [--epochs N]

(a) Every ultrasound object (Modality US) of ``../shared/data/real-files`` and pydicom's test files: the frame
    size, the declared region it is cut to (largest by area, clamped), the pixels removed, and how many of those
    are bright and colourless (>= 200 on every channel, channels within 10 of each other): burned-in text,
    calipers, scales and logos outside the image region.

(b) ``../shared/data/busi-dev`` (323 breast ultrasound images) written as DICOM ultrasound objects (into
    ``--work``, never the repository), each frame = a 40-pixel black banner of white text above the image, the
    image itself declared as the one ultrasound region, BurnedInAnnotation YES. The banner holds scanner-style
    text (vendor, probe, MI/TIS, a date) and, as a reading-room annotation mark might, the word ``BIOPSY`` on
    80% of malignant and 10% of benign images (drawn at random with a fixed seed): a class-correlated mark
    outside the image region, the kind of shortcut real annotation can carry. The repository's demo recipe
    (configs/demo.yaml: frozen EfficientNet-Lite0, pooled 4 stages, duplicate-grouped 5-fold, offline
    augmentation, 1000-bootstrap CI) is trained with ``data.us_region`` auto (the banner is cropped away: the
    model sees the BUSI image only) and off (whole frame, banner included), and, as a control, off on a copy
    whose banners carry no BIOPSY mark (what the banner alone costs or gives); accuracy with its 95% CI.
    The published busi-dev reference for this recipe on the PNGs is 0.811 (0.768-0.851).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("ONCOTRANSFER_ID_SALT", "benchmark-id-salt-16+bytes")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SHARED = ROOT.parent / "shared" / "data"
BANNER = 40


def ultrasound_files() -> list[Path]:
    import pydicom
    import pydicom.data
    from oncotransfer.data.readers.dicom import is_dicom_path
    real = SHARED / "real-files"
    files = [f for f in sorted(real.rglob("*")) if f.is_file() and is_dicom_path(f)] if real.is_dir() else []
    files += [Path(f) for f in sorted(pydicom.data.get_testdata_files()) if Path(f).is_file()]
    out = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        except Exception:  # noqa: BLE001 - not DICOM: not ultrasound either
            continue
        if str(ds.get("Modality", "")) == "US" and "Rows" in ds:
            out.append(f)
    return out


def part_a() -> None:
    import pydicom
    from oncotransfer.data.readers import ImageReadError, open_rgb
    from oncotransfer.data.readers.us_region import region_box
    print("(a) ultrasound objects: what data.us_region: auto cuts off\n")
    print("| file | regions declared | frame | crop box (x0,y0,x1,y1) | crop | pixels removed | bright grey removed "
          "(text, marks) | bright grey kept |")
    print("|---|---|---|---|---|---|---|---|")
    for f in ultrasound_files():
        ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        n = len(ds.get("SequenceOfUltrasoundRegions") or [])
        try:
            whole = np.asarray(open_rgb(f, us_region=False)).astype(int)
        except ImageReadError as e:
            print(f"| {f.name} | {n} | not decoded: {str(e).split(': ', 1)[-1][:60]} | | | | | |")
            continue
        h, w = whole.shape[:2]
        box = region_box(ds, h, w)
        bright = (whole.min(axis=2) >= 200) & (whole.max(axis=2) - whole.min(axis=2) <= 10)
        if box is None:
            print(f"| {f.name} | {n} | {w}x{h} | none | {w}x{h} | 0 | 0 | {int(bright.sum())} |")
            continue
        x0, y0, x1, y1 = box
        inside = np.zeros_like(bright)
        inside[y0:y1 + 1, x0:x1 + 1] = True
        print(f"| {f.name} | {n} | {w}x{h} | {box} | {x1 - x0 + 1}x{y1 - y0 + 1} | {int((~inside).sum())} | "
              f"{int((bright & ~inside).sum())} | {int((bright & inside).sum())} |")


def banner_frame(grey: np.ndarray, text: str):
    from PIL import Image, ImageDraw
    h, w = grey.shape
    frame = Image.new("L", (w, h + BANNER), 0)
    frame.paste(Image.fromarray(grey), (0, BANNER))
    ImageDraw.Draw(frame).text((6, 12), text, fill=255)
    return np.asarray(frame)


def write_dataset(work: Path, seed: int = 0, marks: bool = True) -> Path:
    """busi-dev as US DICOM objects with a banner outside the declared region (``marks``: with the
    class-correlated BIOPSY word); returns the class-folder root."""
    import pandas as pd
    import pydicom
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundImageStorage, generate_uid
    src = SHARED / "busi-dev"
    out = work / ("busi-dev-us" if marks else "busi-dev-us-nomark")
    if (out / "done").is_file():
        return out
    rng = np.random.default_rng(seed)
    rows = pd.read_csv(src / "manifest.csv")
    marked = {"benign": 0, "malignant": 0}
    for i, (path, label) in enumerate(zip(rows.path, rows.label)):
        grey = np.asarray(Image.open(src / path).convert("L"))
        mark = (rng.random() < (0.8 if label == "malignant" else 0.1)) and marks
        marked[label] += int(mark)
        text = f"ACME LOGIQ L12-5  MI 0.9 TIS 0.3  2019-0{1 + i % 9}-1{i % 10}" + ("  BIOPSY" if mark else "")
        pixels = banner_frame(grey, text)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = UltrasoundImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = UltrasoundImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.BurnedInAnnotation = "US", "YES"
        ds.set_pixel_data(pixels, "MONOCHROME2", 8)
        r = Dataset()
        r.RegionSpatialFormat, r.RegionDataType = 1, 1
        r.RegionLocationMinX0, r.RegionLocationMinY0 = 0, BANNER
        r.RegionLocationMaxX1, r.RegionLocationMaxY1 = grey.shape[1] - 1, BANNER + grey.shape[0] - 1
        ds.SequenceOfUltrasoundRegions = [r]
        f = out / label / (Path(path).stem + ".dcm")
        f.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(f, enforce_file_format=True)
    n = rows.label.value_counts().to_dict()
    (out / "done").write_text(f"BIOPSY mark: benign {marked['benign']}/{n['benign']}, "
                              f"malignant {marked['malignant']}/{n['malignant']}\n")
    return out


def part_b(work: Path, epochs: int | None) -> None:
    from oncotransfer.config import load_config, with_updates
    from oncotransfer.experiments.run import run_experiment
    data, plain = write_dataset(work), write_dataset(work, marks=False)
    print(f"\n(b) busi-dev as DICOM US objects with a 40-px banner outside the declared region "
          f"({(data / 'done').read_text().strip()})\n")
    rows = []
    for mode, folder in (("auto", data), ("off", data), ("off, banner without the mark", plain)):
        cfg = load_config(ROOT / "configs" / "demo.yaml")
        train = {"cache_dir": str(work / "cache")} | ({"epochs": epochs} if epochs else {})
        cfg = with_updates(cfg, {"name": f"us-region-{mode.split(',')[0]}{'' if folder is data else '-nomark'}",
                                 "output_dir": str(work / "runs"),
                                 "data": {"path": str(folder), "us_region": mode.split(",")[0]}, "train": train})
        t = time.perf_counter()
        result = run_experiment(cfg, report=True)  # evaluates: pooled metrics, bootstrap CI
        p = result.metrics["pooled"]
        lo, hi = p.get("accuracy_ci95") or (float("nan"), float("nan"))
        rows.append((mode, p["accuracy"], lo, hi, p["balanced_accuracy"], p.get("auc", p.get("roc_auc")),
                     time.perf_counter() - t))
        print(f"  {mode}: accuracy {p['accuracy']:.3f} ({lo:.3f}-{hi:.3f}) in {rows[-1][-1]:.0f} s", flush=True)
    print("\n| data.us_region | model sees | accuracy [95% CI] | balanced accuracy | AUC | train+eval s |")
    print("|---|---|---|---|---|---|")
    for mode, acc, lo, hi, bal, auc, s in rows:
        sees = ("the BUSI image (banner cropped)" if mode == "auto" else "whole frame: image + banner text"
                + (", no class-correlated mark" if "without" in mode else ""))
        auc_s = f"{auc:.3f}" if isinstance(auc, float) else "-"
        print(f"| {mode} | {sees} | {acc:.3f} [{lo:.3f}-{hi:.3f}] | {bal:.3f} | {auc_s} | {s:.0f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/us_region"))
    ap.add_argument("--skip-train", action="store_true", help="part (a) only")
    ap.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (default: as in it)")
    args = ap.parse_args()
    part_a()
    if not args.skip_train:
        if not (SHARED / "busi-dev" / "manifest.csv").is_file():
            print("\n(b) skipped: ../shared/data/busi-dev is absent")
            return 0
        part_b(args.work, args.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
