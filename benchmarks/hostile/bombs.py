"""Memory bombs and no-end inputs (issue 22): files whose headers or compressed streams declare far more than they
hold (deflated DICOM, 10^9 frames, sparse terabyte files, 16000 x 16000 PNGs of a few hundred KB), YAML anchors
that expand exponentially, grids of a million cells, slide tiles above the pixel limit and patient regexes with
catastrophic backtracking; through ``data inspect``, ``train``, ``predict``, ``evaluate --data``, ``cells
extract``, ``slides tile``, ``predict --slide`` and ``grid``. Every case must end within its time limit, under
1.5 GiB, with a one-line error naming the file and the limit (or, for a folder with one bad file, a skip line)."""
from __future__ import annotations

import io
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from core import ROOT, Case, newest_run

sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
from faults_ingest import config, images, png_header  # noqa: E402

F = "bombs"
GiB = 2**30


# ---------------------------------------------------------------- file builders
def _dicom_head(rows: int, cols: int, frames: int, syntax: str, samples: int = 1, bits: int = 8,
                modality: str = "OT") -> tuple[bytes, bytes]:
    """(file meta with preamble, the dataset's elements before PixelData) in Explicit VR Little Endian."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    fm = DicomBytesIO()
    fm.is_little_endian, fm.is_implicit_VR = True, False
    write_file_meta_info(fm, meta, enforce_standard=True)
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = modality, "P1"
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, samples
    ds.PhotometricInterpretation = "MONOCHROME2" if samples == 1 else "RGB"
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit, ds.PixelRepresentation = bits - 1, 0
    if frames != 1:
        ds.NumberOfFrames = frames
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    return b"\0" * 128 + b"DICM" + fm.getvalue(), body.getvalue()


def _pixel_header(n: int) -> bytes:
    return b"\xe0\x7f\x10\x00OB\x00\x00" + struct.pack("<I", n)


def deflated_dicom(path: Path, inflated: int, rows: int = 1024, cols: int = 1024, frames: int | None = None) -> Path:
    """A Deflated Explicit VR Little Endian object whose PixelData inflates to ``inflated`` bytes of zeros
    (about 1/1000 of that on disk)."""
    inflated -= inflated % 2
    frames = frames if frames is not None else max(1, inflated // (rows * cols))
    meta, body = _dicom_head(rows, cols, frames, "1.2.840.10008.1.2.1.99")
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    out = [meta, z.compress(body + _pixel_header(inflated)), z.flush(zlib.Z_FULL_FLUSH)]
    # A full flush resets the window, so one compressed chunk of zeros repeated is a valid stream (fast to build).
    step = 16 << 20
    chunk = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = chunk.compress(b"\0" * step) + chunk.flush(zlib.Z_FULL_FLUSH)
    out += [block] * (inflated // step)
    out += [z.compress(b"\0" * (inflated % step)), z.flush()]
    path.write_bytes(b"".join(out))
    return path


def frames_dicom(path: Path, frames: int, rows: int = 64, cols: int = 64, pixel_bytes: int = 4096,
                 syntax: str = "1.2.840.10008.1.2.1") -> Path:
    """An uncompressed object declaring ``frames`` frames whose pixel data holds ``pixel_bytes`` bytes."""
    meta, body = _dicom_head(rows, cols, frames, syntax)
    path.write_bytes(meta + body + _pixel_header(pixel_bytes) + bytes(range(256)) * (pixel_bytes // 256))
    return path


def sparse(path: Path, size: int, head: bytes = b"") -> Path:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


def zero_png(path: Path, w: int, h: int, mode: str = "L") -> Path:
    """A real PNG of w x h zero pixels (grey or RGB), streamed: a 16000 x 16000 one is about 250 KB."""
    c = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    ch = {"L": 1, "RGB": 3}[mode]
    z = zlib.compressobj(9)
    row = b"\0" * (1 + w * ch)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + c(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, {1: 0, 3: 2}[ch], 0, 0, 0))
                     + c(b"IDAT", idat) + c(b"IEND", b""))
    return path


def tiff_header(w: int, h: int) -> bytes:
    """A little-endian TIFF whose one IFD declares w x h RGB strips that are not there."""
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 2),
               (273, 4, 1, 8), (277, 3, 1, 3), (278, 4, 1, h), (279, 4, 1, min(w * h * 3, 2**32 - 1))]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0" * 4
    return b"II*\x00" + struct.pack("<I", 8) + ifd


def gif_header(w: int, h: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", w, h) + b"\x00\x00\x00" + b",\0\0\0\0" + struct.pack("<HH", w, h) \
        + b"\x00\x02\x02\x44\x01\x00;"


def bmp_header(w: int, h: int) -> bytes:
    return (b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 0, 0,
                                                                        0, 0))


def jpeg_header(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    i = data.find(b"\xff\xc0")
    data[i + 5:i + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def billion_laughs(levels: int = 12, width: int = 9) -> str:
    lines = ["a0: &a0 [lol]"]
    for k in range(1, levels):
        lines.append(f"a{k}: &a{k} [" + ", ".join([f"*a{k - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- cases
def _folder(t: Path, tag: str, name: str, data: bytes | None = None, make=None) -> Path:
    d = images(t / f"d_{tag}")
    f = d / "a" / name
    if make is not None:
        make(f)
    else:
        f.write_bytes(data or b"")
    return d


def _needs_run(t: Path, args: list[str]):
    """A setup that puts the newest run folder in place of ``RUN`` (the run is trained by an earlier case)."""
    def setup() -> None:
        run = str(newest_run(t))
        args[:] = [run if a == "RUN" else a for a in args]
    return setup


def build(t: Path) -> list[Case]:
    cases: list[Case] = []

    def add(name, args, want_error, needles=(), timeout=120, **kw):
        cases.append(Case(F, name, args, want_error, tuple(needles), timeout=timeout, **kw))

    # A small run that the predict and evaluate cases score.
    good = images(t / "good")
    add("train small run", ["train", config(t, good)], False, ("run",), timeout=300)

    # --- deflated DICOM: 600 KB -> ~600 MB, 2.5 MB -> ~2.5 GB inflated
    defl = t / "deflated"
    defl.mkdir()
    d600 = deflated_dicom(defl / "d600.dcm", 600 << 20)
    d2g = deflated_dicom(defl / "d2g.dcm", int(2.5 * GiB))
    dnone = deflated_dicom(defl / "nosuffix", 1200 << 20)
    small = deflated_dicom(defl / "small.dcm", 64 * 64, rows=64, cols=64, frames=1)  # a real, tiny deflated image
    for f in (d600, d2g, dnone):
        d = _folder(t, f.stem, f.name, f.read_bytes())
        add(f"inspect deflated {f.name}", ["data", "inspect", str(d)], False, (f.name, "inflates"))
        add(f"predict deflated {f.name}", ["predict", "RUN", str(f), "--out", str(t / f"p_{f.stem}.csv")], True,
            (f.name, "inflates"))
        add(f"evaluate --data deflated {f.name}", ["evaluate", "RUN", "--data", str(d)], False, (f.name,))
    add("predict deflated small (legitimate)", ["predict", "RUN", str(small), "--out", str(t / "p_small.csv")], False)
    add("train deflated 2.5 GB in a class folder", ["train", config(t, _folder(t, "tr_d2g", "x.dcm",
                                                                                d2g.read_bytes()))], False,
        ("x.dcm", "skipped"), timeout=300)  # the reasons are in run.json; the terminal names the files

    # --- NumberOfFrames far beyond the pixel data
    for n in (10**6, 10**8, 10**9, 2**31 - 1):
        f = frames_dicom(t / f"frames{n}.dcm", n)
        for spec in ("middle", "all", "index:5"):
            d = _folder(t, f"fr{n}_{spec[:3]}", f.name, f.read_bytes())
            add(f"inspect {n} frames ({spec})", ["data", "inspect", str(d), "--dicom-frames", spec], False,
                (f.name, "frames"), timeout=60)
        add(f"predict {n} frames", ["predict", "RUN", str(f), "--out", str(t / f"pf{n}.csv")], True,
            (f.name, "frames"), timeout=60)
    f = frames_dicom(t / "frames_neg.dcm", 10**12)
    add("inspect 10^12 frames (overflow)", ["data", "inspect", str(_folder(t, "fr12", f.name, f.read_bytes()))],
        False, (f.name,), timeout=60)
    big = frames_dicom(t / "huge_frame.dcm", 3, rows=60000, cols=60000, pixel_bytes=4096)
    add("inspect 60000^2 x 3 frames, 4 KB data", ["data", "inspect", str(_folder(t, "hugefr", big.name,
                                                                                  big.read_bytes()))],
        False, (big.name, "frames"), timeout=60)
    f = frames_dicom(t / "jpeg_frames.dcm", 10**8, syntax="1.2.840.10008.1.2.4.50")
    add("inspect encapsulated JPEG, 10^8 frames", ["data", "inspect", str(_folder(t, "encfr", f.name,
                                                                                  f.read_bytes())),
                                                   "--dicom-frames", "all"], False, (f.name,), timeout=60)
    add("train 10^9 frames (all) in a class folder",
        ["train", config(t, _folder(t, "tr_fr", "fr.dcm", (t / "frames1000000000.dcm").read_bytes())),
         "--set", "data.dicom_frames=all"], False, ("fr.dcm",), timeout=300)

    # --- sparse files of a terabyte (and of 5 GB) under image names
    for name, head in (("tb.png", b""), ("tb.dcm", b""), ("tb.jpg", b""), ("tb.tif", b""), ("tb.nii", b""),
                       ("tb_hdr.png", png_header(64, 64)[:33]), ("tb_dicm.dcm", b"\0" * 128 + b"DICM"),
                       ("tb_magic", b"\0" * 128 + b"DICM"), ("g5.png", b""), ("g5.dcm", b"\0" * 128 + b"DICM")):
        size = 5 * GiB if name.startswith("g5") else 2**40
        d = _folder(t, f"sp_{name}", name, make=lambda p, s=size, h=head: sparse(p, s, h))
        add(f"inspect sparse {size >> 30} GiB {name}", ["data", "inspect", str(d)], False, (name, "too large"),
            timeout=60)
        if name in ("tb.png", "tb.dcm"):
            add(f"predict sparse {name}", ["predict", "RUN", str(d / "a" / name), "--out", str(t / f"ps{name}.csv")],
                True, (name, "too large"), timeout=60)
            add(f"train sparse {name} in a class folder", ["train", config(t, d)], False, (name, "skipped"),
                timeout=300)
    sparse(t / "tb_manifest.csv", 2**40, b"path,label\n")
    add("inspect sparse 1 TiB manifest CSV", ["data", "inspect", str(t / "tb_manifest.csv")], True,
        ("tb_manifest.csv", "too large"), timeout=60)

    # --- header bombs in every Pillow format and real zero-filled pixel bombs
    for name, data in (("h60k.png", png_header(60000, 60000)), ("h60k.tif", tiff_header(60000, 60000)),
                       ("h60k.gif", gif_header(65535, 65535)), ("h60k.bmp", bmp_header(60000, 60000)),
                       ("h60k.jpg", jpeg_header(65000, 65000)), ("w1.png", png_header(2**31 - 1, 1)),
                       ("tall.png", png_header(1, 2**31 - 1))):
        d = _folder(t, f"hd_{name}", name, data)
        add(f"inspect header bomb {name}", ["data", "inspect", str(d)], False, (name,), timeout=60)
        add(f"predict header bomb {name}", ["predict", "RUN", str(d / "a" / name), "--out",
                                            str(t / f"ph{name}.csv")], True, (name,), timeout=60)
    p16 = zero_png(t / "z16k.png", 16000, 16000)
    p9 = zero_png(t / "z9k.png", 9000, 9000, "RGB")
    for p in (p16, p9):
        d = _folder(t, f"z_{p.stem}", p.name, p.read_bytes())
        add(f"inspect zero PNG {p.stem}", ["data", "inspect", str(d)], False, (p.name, "too large"), timeout=60)
        add(f"predict zero PNG {p.stem}", ["predict", "RUN", str(p), "--out", str(t / f"pz{p.stem}.csv")], True,
            (p.name, "too large"), timeout=60)
        raw = t / f"cells_{p.stem}"
        (raw / "c").mkdir(parents=True)
        (raw / "c" / p.name).write_bytes(p.read_bytes())
        add(f"cells extract zero PNG {p.stem}", ["cells", "extract", str(raw), str(t / f"cout_{p.stem}")], True,
            (p.name, "too large"), timeout=90)
    raw = t / "cells_sparse"
    (raw / "c").mkdir(parents=True)
    sparse(raw / "c" / "tb.png", 2**40)
    add("cells extract sparse 1 TiB png", ["cells", "extract", str(raw), str(t / "cout_sparse")], True,
        ("tb.png",), timeout=60)
    raw = t / "cells_hdr"
    (raw / "c").mkdir(parents=True)
    (raw / "c" / "h.tif").write_bytes(tiff_header(60000, 60000))
    add("cells extract TIFF header bomb", ["cells", "extract", str(raw), str(t / "cout_hdr")], True, ("h.tif",),
        timeout=60)

    # --- slides: tiles above the pixel limit, absurd sizes
    from slidegen import write_slide
    slides = t / "slides"
    slides.mkdir()
    write_slide(slides / "s.tif", lambda d, y, x, h, w: np.full((h, w, 3), (180, 120, 170), np.uint8), 2048, 2048,
                mpp=0.25, levels=3)
    for size in (16000, 9000, 10**6, 2**31):
        add(f"slides tile --tile-size {size}", ["slides", "tile", str(slides), str(t / f"tiles{size}"),
                                                "--tile-size", str(size)], True, ("tile",), timeout=90)
        add(f"predict --slide --tile-size {size}", ["predict", "RUN", str(slides), "--slide", "--tile-size",
                                                    str(size), "--out", str(t / f"sl{size}.csv")], True,
            ("tile",), timeout=90)
    add("slides tile --mpp 1e-6", ["slides", "tile", str(slides), str(t / "tiles_mpp"), "--mpp", "1e-6"], True,
        ("mpp",), timeout=90)
    add("predict --slide --mpp 1e-6", ["predict", "RUN", str(slides), "--slide", "--mpp", "1e-6", "--out",
                                       str(t / "slmpp.csv")], True, ("mpp",), timeout=90)

    # --- YAML: billion laughs in a config, a grid file and --set; deep nesting
    for name, text in (("laughs_top", billion_laughs()),
                       ("laughs_in_data", "data:\n  path: x\n  extra: " + "&x [a]\n" + "".join(
                           f"  e{k}: &x{k} [{', '.join(['*x' if k == 0 else f'*x{k - 1}'] * 9)}]\n"
                           for k in range(10))),
                       ("deep_flow", "data: " + "[" * 100000 + "]" * 100000 + "\n"),
                       ("deep_block", "".join("  " * k + f"k{k}:\n" for k in range(3000)) + "  " * 3000 + "v\n"),
                       ("many_keys", "".join(f"k{k}: {k}\n" for k in range(300000)))):
        p = t / f"{name}.yaml"
        p.write_text(text)
        add(f"train YAML {name}", ["train", str(p)], True, (p.name,), no_run_folder=True, timeout=60)
        g = t / f"grid_{name}.yaml"
        g.write_text(text if name != "laughs_in_data" else text.replace("data:\n  path: x\n", "base:\n  n: 1\n"))
        add(f"grid YAML {name}", ["grid", str(g)], True, (g.name,), no_run_folder=True, timeout=60)
    add("train --set billion laughs", ["train", config(t, good), "--set",
                                       "train.lr=" + billion_laughs(9, 9).replace("\n", ", ").join("{}")],
        True, ("train.lr",), no_run_folder=True, timeout=60)
    add("train --set deep flow", ["train", config(t, good), "--set", "train.lr=" + "[" * 50000 + "]" * 50000], True,
        ("train.lr",), no_run_folder=True, timeout=60)

    # --- grids of a million cells and more
    base = config(t, good)
    for name, grid in (("1e6 values", "  train.lr: [" + ", ".join(f"{1e-3 + k * 1e-9:.9f}" for k in range(10**6))
                        + "]\n"),
                       ("1000 x 1000", "  train.lr: [" + ", ".join(f"{1e-3 + k * 1e-7:.7f}" for k in range(1000))
                        + "]\n  train.seed: [" + ", ".join(str(k) for k in range(1000)) + "]\n"),
                       ("10^12 product", "".join(f"  k{j}: [" + ", ".join(str(k) for k in range(10)) + "]\n"
                                                 for j in range(12)).replace("  k", "  train.k")),
                       ("trials 10^9", None)):
        g = t / f"g{len(cases)}.yaml"
        if grid is None:
            g.write_text(f"base_config: {base}\ntrials: 1000000000\n")
        else:
            g.write_text(f"base_config: {base}\ngrid:\n{grid}")
        # a million values is a 13 MB file, refused by its size before it is parsed
        add(f"grid {name}", ["grid", str(g)], True, ("too large" if name == "1e6 values" else "runs",),
            no_run_folder=True, timeout=90)

    # --- patient regexes with catastrophic backtracking, on long file names
    d = images(t / "regex", per_class=3)
    for c in "ab":
        (d / c / ("a" * 60 + f"{c}.png")).write_bytes((d / c / f"{c}0.png").read_bytes())
    for rx in ("^(a+)+$", "(a|aa)+$", "^(a|a?)+$", "(.*a){20}", "^((a+)+)+b"):
        add(f"inspect --patient-regex {rx}", ["data", "inspect", str(d), "--patient-regex", rx], True,
            ("patient_regex",), timeout=60)
    add("train data.patient_regex (a+)+$", ["train", config(t, d), "--set", "data.patient_regex=^(a+)+$"], True,
        ("patient_regex",), no_run_folder=True, timeout=90)
    add("inspect --patient-regex invalid", ["data", "inspect", str(d), "--patient-regex", "(["], True,
        ("patient_regex",), timeout=60)

    for c in cases:  # predict / evaluate cases score the run trained first
        if "RUN" in c.args:
            c.setup = _needs_run(t, c.args)
    return cases
