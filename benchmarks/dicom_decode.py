"""Every DICOM object we can find through oncotransfer's one decode path: loaded, one-line reason, or traceback;
blank decodes; and twins (the same image in another transfer syntax) compared pixel for pixel.

    python benchmarks/dicom_decode.py [--real PATH] [--quiet]

Files: every DICOM under ``../shared/data/real-files`` (recursively; objects from real scanners, see its README)
and every file of ``pydicom.data.get_testdata_files()`` (CT, MR, RGB secondary capture, JPEG / JPEG-LS /
JPEG 2000 / RLE / deflate variants, palette colour, big-endian, multi-frame, files without preamble or file meta,
DICOMDIRs, structured reports, RT objects, a truncated image, and a few non-DICOM helpers). Each is opened with
``data.readers.open_rgb`` on the whole frame (``us_region=False``, so twins compare the same pixels; the
``crop`` column gives the size ``data.us_region: auto`` cuts it to).

Outcome: ``loaded``, the one-line ``ImageReadError`` reason, or ``TRACEBACK`` (anything else escaped: target 0).
Twins: files of one family (the name with its transfer-syntax tag removed: ``OBXXXX1A{,_expb,_rle}``,
``US1_{UNCR,J2KR}``, ``MR_small{,_RLE,_bigendian,...}``, ``SC_rgb{,_rle,_16bit,...}``) whose transfer syntax is
lossless must decode to identical pixels; ``DIFFERS`` there is a silent wrong answer (target 0). Lossy members
are compared for information only. ``blank`` is ``data.readers.quality.blank_reason``; the lowest pixel standard
deviation of the images that are not blank is printed to show the margin above its threshold.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

os.environ.setdefault("ONCOTRANSFER_ID_SALT", "benchmark-id-salt-16+bytes")  # no key file written on the benchmark machine
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

LOSSLESS = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
            "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
            "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202"}
"""Uncompressed (implicit / explicit little, big endian, deflated), RLE, JPEG lossless (14, 14 SV1), JPEG-LS
lossless, JPEG 2000 lossless, HTJ2K lossless (and its RPCL variant)."""
LOSSLESS_UNCOMPRESSED = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
SYNTAX_TAGS = re.compile(r"_(expb|rle|uncr|j2kr|j2ki|bigendian|big_endian|implicit|jp2klossless|jpeg_ls_lossless|"
                         r"padded|16bit|32bit|dfl|bigend|litend|bigendnometa|litendnometa)(?=_|$)", re.I)


def family(name: str) -> str:
    """``MR_small_jpeg_ls_lossless.dcm`` -> ``mr_small``; the frame-count tag (``_2frame``) stays: another image."""
    stem = re.sub(r"\.(dcm|dicom)$", "", name, flags=re.I)
    prev = None
    while prev != stem:
        prev, stem = stem, SYNTAX_TAGS.sub("", stem)
    return stem.lower()


def collect(real: Path) -> list[tuple[str, Path]]:
    import pydicom.data
    from oncotransfer.data.readers.dicom import is_dicom_path
    files = [("real", f) for f in sorted(real.rglob("*")) if f.is_file() and is_dicom_path(f)] if real.is_dir() else []
    return files + [("pydicom", Path(f)) for f in sorted(pydicom.data.get_testdata_files()) if Path(f).is_file()]


def header(f: Path) -> tuple[str, tuple]:
    """(transfer syntax, (SOP class, rows, columns, frames)): twins share the second."""
    import pydicom
    try:
        ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
    except Exception:  # noqa: BLE001
        return "", ()
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "1.2.840.10008.1.2")) if meta is not None else "1.2.840.10008.1.2"
    return ts, (str(ds.get("SOPClassUID", "")), ds.get("Rows"), ds.get("Columns"), ds.get("NumberOfFrames", 1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--real", type=Path, default=ROOT.parent / "shared" / "data" / "real-files")
    ap.add_argument("--quiet", action="store_true", help="summary only")
    args = ap.parse_args()
    import pydicom
    import pydicom.data
    from oncotransfer.data.readers import ImageReadError, open_rgb, reader_for
    from oncotransfer.data.readers.dicom import is_dicom_path
    from oncotransfer.data.readers.quality import blank_reason
    rows, decoded = [], {}
    for origin, f in collect(args.real):
        dicom = is_dicom_path(f)
        try:
            reader = reader_for(f).name
        except Exception:  # noqa: BLE001
            reader = "-"
        size = crop = blank = ""
        try:
            img = open_rgb(f, us_region=False)
            outcome, size = "loaded", f"{img.size[0]}x{img.size[1]}"
            a = np.asarray(img)
            decoded[f] = a
            blank = blank_reason(a) or ""
            try:
                c = open_rgb(f).size
                crop = f"{c[0]}x{c[1]}" if c != img.size else ""
            except ImageReadError:
                pass
        except ImageReadError as e:
            outcome = str(e).replace(str(f), f.name)
            outcome = outcome if "\n" not in outcome else "TRACEBACK " + outcome.splitlines()[0]
        except Exception as e:  # noqa: BLE001 - this is what the benchmark counts
            outcome = f"TRACEBACK {type(e).__name__}: {e}".splitlines()[0]
            traceback.print_exc(file=sys.stderr)
        rows.append(dict(origin=origin, file=f, dicom=dicom, reader=reader, outcome=outcome, size=size, crop=crop,
                         blank=blank, twin=""))
    # twins: the same image in several transfer syntaxes
    fams: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if r["dicom"]:  # same family name, SOP class, size and frame count
            r["ts"], key = header(r["file"])
            r["lossless"] = r["ts"] in LOSSLESS
            fams[f"{family(r['file'].name)} {key}"].append(r)
    for members in fams.values():
        if len(members) < 2:
            continue
        loaded = [r for r in members if r["outcome"] == "loaded"]
        refs = sorted((r for r in loaded if r["lossless"]),  # an uncompressed member is the reference when any
                      key=lambda r: (r["ts"] not in LOSSLESS_UNCOMPRESSED, r["file"].name))
        if not refs:
            outcomes = {r["outcome"].split(": ", 1)[-1] for r in members}
            for r in members:
                r["twin"] = "refused like its twins" if len(outcomes) == 1 else "twins disagree on refusal"
            continue
        ref = refs[0]
        for r in members:
            if r is ref:
                r["twin"] = "reference"
            elif r["outcome"] != "loaded":
                r["twin"] = f"not loaded, twin {ref['file'].name} loads" if r["lossless"] else "lossy, not loaded"
            elif decoded[r["file"]].shape != decoded[ref["file"]].shape:
                r["twin"] = f"size differs from {ref['file'].name}" + ("" if r["lossless"] else " (lossy)")
            else:
                d = np.abs(decoded[r["file"]].astype(int) - decoded[ref["file"]].astype(int)).mean()
                if r["lossless"]:
                    r["twin"] = f"= {ref['file'].name}" if d == 0 else f"DIFFERS from {ref['file'].name} ({d:.2f})"
                else:
                    r["twin"] = f"lossy: mean |diff| {d:.2f} vs {ref['file'].name}"
    if not args.quiet:
        print("| origin | file | reader | outcome | size | crop | blank? | twin check |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            if r["dicom"]:
                print(f"| {r['origin']} | {r['file'].name} | {r['reader']} | {r['outcome']} | {r['size']} | "
                      f"{r['crop']} | {r['blank']} | {r['twin']} |")
    dic = [r for r in rows if r["dicom"]]
    n_tb = sum(r["outcome"].startswith("TRACEBACK") for r in rows)
    silent = [r for r in dic if r["twin"].startswith(("DIFFERS", "not loaded", "twins disagree", "size differs"))
              and r.get("lossless")]
    stds = [float(a.std()) for f, a in decoded.items() if not blank_reason(a)]
    print(f"\npydicom {pydicom.__version__}; real-files: {args.real if args.real.is_dir() else 'absent'}")
    print(f"{'files':<28}{'n':>5}{'loaded':>8}{'reason':>8}{'traceback':>11}{'blank':>7}")
    for origin in ("real", "pydicom"):
        for is_dicom, label in ((True, "DICOM"), (False, "not DICOM")):
            sel = [r for r in rows if r["origin"] == origin and r["dicom"] == is_dicom]
            if not sel:
                continue
            c = Counter("loaded" if r["outcome"] == "loaded" else "traceback" if r["outcome"].startswith("TRACEBACK")
                        else "reason" for r in sel)
            print(f"{origin + ' ' + label:<28}{len(sel):>5}{c['loaded']:>8}{c['reason']:>8}{c['traceback']:>11}"
                  f"{sum(bool(r['blank']) for r in sel):>7}")
    compared = [r for r in dic if r["twin"].startswith("=")]
    print(f"twin families: {sum(len(m) > 1 for m in fams.values())}; lossless twins identical to their reference: "
          f"{len(compared)}; silent wrong (lossless twin differs, fails or changes size): {len(silent)}")
    for r in silent:
        print(f"  SILENT WRONG: {r['file'].name}: {r['twin']}")
    if stds:
        print(f"lowest pixel std of an image that is not blank: {min(stds):.1f} of 255 (blank threshold: std < 2)")
    print(f"cropped to a declared ultrasound region: {sum(bool(r['crop']) for r in dic)} object(s)")
    reasons = Counter(r["outcome"].split(": ", 1)[-1].split(" (", 1)[0] for r in dic
                      if r["outcome"] != "loaded")
    print("reasons given (DICOM files):")
    for kind, n in reasons.most_common():
        print(f"  {n:4d}  {kind}")
    return 1 if n_tb or silent else 0


if __name__ == "__main__":
    sys.exit(main())
