"""DICOM objects cut short or written without their preamble, with and without a suffix, in a class folder:
each is read (when whole) or named with a reason by ``data inspect`` and ``train``'s loader, never lost without a
word (issue 22: suffix-less objects truncated inside the header vanished from ``data inspect``)."""
from __future__ import annotations

import sys
from pathlib import Path

from core import ROOT, Case

sys.path.insert(0, str(ROOT / "benchmarks"))
from faults_ingest import images  # noqa: E402

F = "dicom_edges"
CUTS = (0, 1, 60, 100, 127, 128, 131, 132, 140, 200, 400, 1000)


def _sources() -> dict[str, bytes]:
    """Real objects with a zeroed preamble, a TIFF preamble (dual-personality files) and none at all."""
    import pydicom
    from pydicom.data import get_testdata_file
    out = {}
    for name in ("rtplan.dcm", "CT_small.dcm", "MR_small.dcm"):
        f = get_testdata_file(name)
        if f:
            out[name.split(".")[0]] = Path(f).read_bytes()
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.preamble = None
    del ds.file_meta
    import io
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False, implicit_vr=True, little_endian=True)
    out["raw_CT"] = buf.getvalue()
    return out


def _named(name: str):
    def check(r, t):
        if name not in " ".join(r.out.split()):
            return "silent", f"{name} not named: {' '.join(r.out.split())[-100:]}"
        return None
    return check


def build(t: Path) -> list[Case]:
    cases = []
    for src, data in _sources().items():
        for cut in CUTS:
            for suffix in ("", ".dcm"):
                d = images(t / f"{src}_{cut}{suffix or '_nosuffix'}")
                name = f"obj_{src}_{cut}{suffix}"
                (d / "a" / name).write_bytes(data[:cut])
                cases.append(Case(F, f"inspect {src} cut at {cut} bytes{' (.dcm)' if suffix else ''}",
                                  ["data", "inspect", str(d)], False, check=_named(name)))
        d = images(t / f"{src}_whole")
        (d / "a" / f"obj_{src}").write_bytes(data)
        if src == "rtplan":  # a treatment plan holds no image: named with that reason
            cases.append(Case(F, f"inspect {src} whole, no suffix", ["data", "inspect", str(d)], False,
                              ("obj_rtplan", "without pixel data (RTPLAN)")))
        else:
            cases.append(Case(F, f"inspect {src} whole, no suffix", ["data", "inspect", str(d)], False,
                              ("images, 2 classes",),
                              check=lambda r, t, n=f"obj_{src}": ("silent", f"{n} named as a problem")
                              if f"a/{n}" in r.stderr else None))
    return cases
