"""Every file shipped in pydicom's wheel through oncotransfer's one decode path: loaded, one-line reason, traceback.

    python benchmarks/dicom_decode.py [--list]

``pydicom.data.get_testdata_files()`` lists pydicom's own test objects (CT, MR, RGB secondary capture, JPEG /
JPEG-LS / JPEG 2000 / RLE / deflate variants, palette colour, multi-frame, big-endian, files without preamble
or file meta, DICOMDIRs, structured reports, RT objects, a truncated image) plus a few non-DICOM helper files
(README, JSON, ICC profiles). Each is opened with ``data.images.open_rgb`` (which hands DICOM to
``data/dicom.py``) and falls in one of three columns: an RGB image came back, an ``ImageReadError`` gave one
line, or anything else escaped (a traceback for a user: the target is 0). ``--list`` prints every file's
outcome. The table splits files that are DICOM (``is_dicom_path``: a DICOM suffix, or the DICM magic) from the
rest, and counts the reasons by kind.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("ONCOTRANSFER_ID_SALT", "benchmark")  # no key file written on the benchmark machine
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def reason_kind(line: str) -> str:
    """The reason's kind: the text after the file name, without the details in brackets."""
    return line.split(": ", 1)[-1].split(" (", 1)[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--list", action="store_true", help="print every file's outcome")
    args = ap.parse_args()
    import pydicom
    import pydicom.data
    from oncotransfer.data.dicom import is_dicom_path
    from oncotransfer.data.images import ImageReadError, open_rgb
    root = Path(pydicom.data.__file__).parent
    files = sorted(Path(f) for f in pydicom.data.get_testdata_files() if Path(f).is_file())
    table = {True: Counter(), False: Counter()}
    reasons: Counter = Counter()
    for f in files:
        dicom = is_dicom_path(f)
        try:
            img = open_rgb(f)
            outcome, text = "loaded", f"{img.size[0]}x{img.size[1]} {img.mode}"
        except ImageReadError as e:
            text = str(e)
            outcome = "reason" if "\n" not in text else "traceback"
            reasons[reason_kind(text)] += 1
        except Exception as e:  # noqa: BLE001 - this is what the benchmark counts
            outcome, text = "traceback", f"{type(e).__name__}: {e}"
        table[dicom][outcome] += 1
        if args.list:
            print(f"{outcome:9s} {f.relative_to(root)}: {text.replace(str(f), f.name)}")
    print(f"pydicom {pydicom.__version__}: {len(files)} files in get_testdata_files()")
    print(f"{'files':<12}{'n':>5}{'loaded':>8}{'reason':>8}{'traceback':>11}")
    for dicom, name in ((True, "DICOM"), (False, "not DICOM")):
        c = table[dicom]
        print(f"{name:<12}{sum(c.values()):>5}{c['loaded']:>8}{c['reason']:>8}{c['traceback']:>11}")
    print("reasons given:")
    for kind, n in reasons.most_common():
        print(f"  {n:4d}  {kind}")
    return 1 if table[True]["traceback"] + table[False]["traceback"] else 0


if __name__ == "__main__":
    sys.exit(main())
