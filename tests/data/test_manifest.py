"""Manifests from folders and CSVs, image decoding in every mode, unreadable files, duplicate detection."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oncotransfer.data.images import decode_many, phash64
from oncotransfer.data.readers import ImageReadError, open_rgb
from oncotransfer.data.inspect import inspect_dataset
from oncotransfer.data.manifest import duplicate_groups, load_manifest, sha256_file
from oncotransfer.errors import DataError


def solid(path: Path, colour=(200, 30, 30), size=(16, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def photo(kind: str = "astronaut", size: int = 128) -> Image.Image:
    import skimage.data
    return Image.fromarray(getattr(skimage.data, kind)()).convert("RGB").resize((size, size), Image.BILINEAR)


# ---------------------------------------------------------------- manifests

def test_class_folders(tmp_path):
    for c, n in (("benign", 2), ("malignant", 3)):
        for i in range(n):
            solid(tmp_path / c / f"{i}.png", (i * 40, 0, 0))
    (tmp_path / "benign" / "notes.txt").write_text("not an image")
    m = load_manifest(tmp_path)
    assert m.classes == ["benign", "malignant"]
    assert len(m) == 5 and sorted(np.bincount(m.labels).tolist()) == [2, 3]
    assert m.patients is None
    assert m.sha256[0] == sha256_file(m.paths[0])
    assert all(Path(p).suffix == ".png" for p in m.paths)


def test_csv_manifest_with_patients(tmp_path):
    for i in range(4):
        solid(tmp_path / "img" / f"{i}.png", (i * 50, 10, 10))
    csv = tmp_path / "list.csv"
    csv.write_text("path,label,patient\n" + "".join(f"img/{i}.png,{'ab'[i % 2]},P{i // 2}\n" for i in range(4)))
    m = load_manifest(csv)
    assert m.classes == ["a", "b"]
    assert m.labels.tolist() == [0, 1, 0, 1]
    assert m.patients.tolist() == ["P0", "P0", "P1", "P1"]
    # a folder holding manifest.csv is read the same way
    (tmp_path / "manifest.csv").write_text(csv.read_text())
    assert load_manifest(tmp_path).patients.tolist() == ["P0", "P0", "P1", "P1"]


def test_patient_regex_on_tcia_names(tmp_path):
    names = {"Viable": ["Case-3-A15-2939-11262_112.jpg", "Case-48-B1-1-2_7.jpg"],
             "Non-Tumor": ["P9-1-2-3_4.jpg", "Case-3-A18-11012-16647_113.jpg"]}
    for c, files in names.items():
        for f in files:
            solid(tmp_path / c / f)
    m = load_manifest(tmp_path, patient_regex=r"^(Case-\d+|P\d+)")
    got = {Path(p).name: pt for p, pt in zip(m.paths, m.patients)}
    assert got == {"Case-3-A15-2939-11262_112.jpg": "Case-3", "Case-48-B1-1-2_7.jpg": "Case-48",
                   "P9-1-2-3_4.jpg": "P9", "Case-3-A18-11012-16647_113.jpg": "Case-3"}
    with pytest.raises(DataError, match="does not match file name"):
        load_manifest(tmp_path, patient_regex=r"^Patient(\d+)")
    with pytest.raises(DataError, match="not a valid regular expression"):
        load_manifest(tmp_path, patient_regex=r"^(Case")


def test_bad_inputs_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_manifest(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        load_manifest(tmp_path / "empty")
    solid(tmp_path / "one" / "tumor" / "a.png")
    with pytest.raises(DataError, match="only 1 class"):
        load_manifest(tmp_path / "one")
    solid(tmp_path / "loose" / "a.png")
    (tmp_path / "loose" / "sub").mkdir()
    with pytest.raises(DataError, match="sub-folder per class"):
        load_manifest(tmp_path / "loose")
    bad = tmp_path / "cols.csv"
    bad.write_text("file,class\na.png,x\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['label', 'path'\]"):
        load_manifest(bad)
    listed = tmp_path / "listed.csv"
    solid(tmp_path / "x.png")
    listed.write_text("path,label\nx.png,a\ngone.png,b\n")
    with pytest.raises(DataError, match="1 listed file.*gone.png"):
        load_manifest(listed)


# ---------------------------------------------------------------- decoding

def test_greyscale_rgba_palette_and_16bit_become_rgb(tmp_path):
    grey = tmp_path / "grey.png"
    Image.fromarray(np.tile(np.arange(0, 256, 16, dtype=np.uint8), (8, 1)), "L").save(grey)
    g = np.asarray(open_rgb(grey))
    assert g.shape == (8, 16, 3) and (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    assert g[0, 0, 0] == 0 and g[0, -1, 0] == 240

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:4] = (255, 0, 0, 255)      # opaque red top half
    rgba[4:] = (0, 0, 255, 0)        # fully transparent bottom half -> white background
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    a = np.asarray(open_rgb(tmp_path / "rgba.png"))
    assert a.shape == (8, 8, 3)
    assert tuple(a[0, 0]) == (255, 0, 0) and tuple(a[7, 7]) == (255, 255, 255)

    pal = Image.new("RGB", (8, 8), (0, 128, 0)).convert("P", palette=Image.ADAPTIVE, colors=4)
    assert pal.mode == "P"
    pal.save(tmp_path / "pal.png")
    p = np.asarray(open_rgb(tmp_path / "pal.png"))
    assert p.shape == (8, 8, 3) and tuple(p[3, 3]) == (0, 128, 0)

    ramp = np.tile(np.linspace(1000, 60000, 32).astype(np.uint16), (4, 1))
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    d = np.asarray(open_rgb(tmp_path / "deep.png"))[0, :, 0].astype(int)
    # stretched to the full 8-bit range, monotone, not clipped to 255
    assert d[0] == 0 and d[-1] == 255 and (np.diff(d) >= 0).all() and len(np.unique(d)) > 20


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)       # 40 wide, 20 high: left half red, right half blue
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6                            # "rotate 90 CW to display"
    path = tmp_path / "rot.jpg"
    img.save(path, quality=95, exif=exif.tobytes())
    out = np.asarray(open_rgb(path)).astype(int)
    assert out.shape == (40, 20, 3)             # displayed upright: portrait
    top, bottom = out[5, 10], out[35, 10]       # the stored left edge is now the top
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_unreadable_files_are_reported_not_raised(tmp_path):
    good = solid(tmp_path / "good.png")
    buf = io.BytesIO()
    photo(size=64).save(buf, "JPEG", quality=90)
    trunc = tmp_path / "trunc.jpg"
    trunc.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    text = tmp_path / "text.png"
    text.write_text("hello, I am not a PNG")
    with pytest.raises(ImageReadError, match="text.png"):
        open_rgb(text)
    images, ok, failed, hashes = decode_many([str(good), str(trunc), str(text)], 32, workers=2, phash=True)
    assert ok == [0]
    assert images.shape == (1, 3, 32, 32) and images.dtype == torch.uint8
    assert set(failed) == {1, 2}
    assert "trunc.jpg" in failed[1] and "text.png" in failed[2]
    assert hashes is not None and len(hashes) == 1


# ---------------------------------------------------------------- duplicates

def _variants(tmp_path: Path) -> list[Path]:
    base = photo("astronaut", 160)
    a = tmp_path / "orig.png"
    base.save(a)
    b = tmp_path / "copy.png"
    b.write_bytes(a.read_bytes())                                   # byte-identical
    c = tmp_path / "recompressed.jpg"
    base.resize((120, 120), Image.BILINEAR).save(c, quality=75)     # near-identical
    d = tmp_path / "other.png"
    photo("coffee", 160).save(d)                                    # different
    e = tmp_path / "third.png"
    photo("chelsea", 160).save(e)                                   # different
    return [a, b, c, d, e]


def test_duplicate_groups_exact_and_near(tmp_path):
    files = _variants(tmp_path)
    sha = [sha256_file(f) for f in files]
    exact = duplicate_groups(sha)
    assert exact[0] == exact[1] and len(set(exact.tolist())) == 4
    ph = np.array([phash64(open_rgb(f)) for f in files], dtype=np.uint64)
    near = duplicate_groups(sha, ph)
    assert near[0] == near[1] == near[2]
    assert len({near[0], near[3], near[4]}) == 3


def test_inspect_flags_near_duplicate_under_two_classes(tmp_path):
    photo("astronaut", 160).save(solid(tmp_path / "benign" / "a.png"))
    photo("coffee", 160).save(solid(tmp_path / "benign" / "b.png"))
    photo("chelsea", 160).save(solid(tmp_path / "malignant" / "c.png"))
    photo("astronaut", 160).resize((128, 128)).save(tmp_path / "malignant" / "a_copy.jpg", quality=80)
    (tmp_path / "malignant" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rep = inspect_dataset(tmp_path)
    assert rep.per_class == {"benign": 2, "malignant": 2}
    assert list(rep.unreadable) == ["malignant/broken.png"]
    assert len(rep.cross_class) == 1
    flagged = " ".join(rep.cross_class[0])
    assert "benign/a.png" in flagged and "malignant/a_copy.jpg" in flagged
    assert "b.png" not in flagged and "c.png" not in flagged
