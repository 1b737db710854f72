"""Cell detection and patch extraction on synthetic microscope fields (plus real data when present)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from oncotransfer.data.cells import CellParams, extract_cells, extract_patch, find_cells
from oncotransfer.errors import DataError

REAL = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "cell-lines"

# (cy, cx, ry, rx): non-overlapping; the last two are cut by the top / right border.
CELLS = [(120, 150, 20, 14), (140, 420, 12, 12), (330, 260, 25, 18), (300, 600, 16, 22),
         (480, 140, 18, 18), (500, 470, 14, 24), (18, 700, 23, 16), (420, 776, 15, 24)]
DEBRIS = [(60, 300), (250, 80), (220, 520), (560, 650), (400, 380), (80, 560)]


def make_field(polarity: str = "bright", seed: int = 0, h: int = 600, w: int = 800) -> np.ndarray:
    """Float field in [0, 1]: gradient background, noise, elliptical cells with texture, tiny debris."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    bg = 0.40 + 0.20 * xx / w + 0.05 * yy / h  # uneven illumination
    sign = 1.0 if polarity == "bright" else -1.0
    img = bg.copy()
    for cy, cx, ry, rx in CELLS:
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        img[inside] += sign * (0.25 + 0.05 * rng.standard_normal(inside.sum()))
    for cy, cx in DEBRIS:  # area ~13 px, far below min_size
        img[((yy - cy) ** 2 + (xx - cx) ** 2) <= 4] += sign * 0.3
    img += 0.02 * rng.standard_normal((h, w))
    return np.clip(img, 0, 1).astype(np.float32)


def centre(box):
    y0, x0, y1, x1 = box
    return (y0 + y1) / 2, (x0 + x1) / 2


def assert_matches_truth(boxes, h: int = 600, w: int = 800):
    assert len(boxes) == len(CELLS), boxes
    found = np.array([centre(b) for b in boxes])
    for cy, cx, ry, rx in CELLS:
        # Centre of the visible (border-clipped) ellipse: that is what a box can see.
        ty = (max(cy - ry, 0) + min(cy + ry, h - 1)) / 2
        tx = (max(cx - rx, 0) + min(cx + rx, w - 1)) / 2
        assert np.hypot(found[:, 0] - ty, found[:, 1] - tx).min() <= 3.0, ((cy, cx), found)
    assert any(b[0] == 0 for b in boxes) and any(b[3] == w for b in boxes)  # border cells kept


@pytest.mark.parametrize("polarity", ["bright", "dark"])
def test_find_cells_auto_polarity_finds_every_cell_and_ignores_debris(polarity):
    boxes = find_cells(make_field(polarity), CellParams())
    assert_matches_truth(boxes)
    assert boxes == sorted(boxes)


@pytest.mark.parametrize("polarity", ["bright", "dark"])
def test_explicit_polarity_agrees_with_auto_and_the_opposite_one_boxes_halos(polarity):
    field = make_field(polarity, seed=3)
    right = find_cells(field, CellParams(polarity=polarity))
    assert right == find_cells(field, CellParams())
    wrong = find_cells(field, CellParams(polarity="dark" if polarity == "bright" else "bright"))

    def mean_area(boxes):
        return np.mean([(y1 - y0) * (x1 - x0) for y0, x0, y1, x1 in boxes])

    # Inverted, the threshold picks the shadow ring around each cell: boxes far too big.
    assert mean_area(wrong) > 2 * mean_area(right)


def test_find_cells_accepts_uint16_and_max_cells_keeps_largest():
    field16 = (make_field("bright") * 4095).astype(np.uint16)  # 12-bit camera in 16-bit container
    assert_matches_truth(find_cells(field16, CellParams()))
    top2 = find_cells(field16, CellParams(max_cells_per_image=2))
    assert len(top2) == 2
    areas = sorted(((y1 - y0) * (x1 - x0) for y0, x0, y1, x1 in find_cells(field16, CellParams())), reverse=True)
    assert sorted((b[2] - b[0]) * (b[3] - b[1]) for b in top2) == sorted(areas[:2])


def test_flat_field_has_no_cells():
    assert find_cells(np.full((100, 120), 7, np.uint8), CellParams()) == []


@pytest.mark.parametrize("box", [(0, 0, 10, 10), (590, 790, 600, 800), (0, 395, 30, 405), (290, 390, 310, 410)])
@pytest.mark.parametrize("mode", ["reflect", "constant", "edge"])
def test_extract_patch_is_always_exact_size_and_keeps_channels(box, mode):
    rgb = np.random.default_rng(1).integers(1, 255, (600, 800, 3), dtype=np.uint8)
    p = extract_patch(rgb, box, 200, mode)
    assert p.shape == (200, 200, 3) and p.dtype == np.uint8
    assert extract_patch(rgb[..., 0], box, 200, mode).shape == (200, 200)


def test_extract_patch_centres_on_box_and_pads_as_asked():
    img = np.arange(50 * 60, dtype=np.int32).reshape(50, 60)
    p = extract_patch(img, (20, 30, 31, 41), 9, "constant")  # centre (25, 35)
    assert p[4, 4] == img[25, 35]
    corner = extract_patch(img, (0, 0, 2, 2), 10, "constant")  # centre (1, 1): 4 rows/cols of padding
    assert (corner[:4] == 0).all() and (corner[:, :4] == 0).all() and corner[4, 4] == img[0, 0]
    refl = extract_patch(img, (0, 0, 2, 2), 10, "reflect")
    assert refl[3, 4] == img[1, 0] and refl[4, 3] == img[0, 1]  # mirrored, edge not repeated
    tiny = extract_patch(np.ones((3, 2), np.uint8), (0, 0, 3, 2), 200, "reflect")
    assert tiny.shape == (200, 200) and (tiny == 1).all()


def test_extract_patch_rejects_box_outside_image():
    with pytest.raises(DataError, match="outside"):
        extract_patch(np.zeros((50, 50)), (40, 40, 60, 60), 20)


def write_raw(root: Path) -> Path:
    """RAW/bright: RGB 8-bit PNGs; RAW/dark: 16-bit grey TIFFs; plus a stray non-image file."""
    raw = root / "raw"
    (raw / "bright").mkdir(parents=True)
    (raw / "dark").mkdir()
    for i in range(2):
        g = make_field("bright", seed=10 + i)
        rgb = np.stack([g, g * 0.8, g * 0.6], axis=-1)
        Image.fromarray((rgb * 255).astype(np.uint8)).save(raw / "bright" / f"field{i}.png")
        cv2.imwrite(str(raw / "dark" / f"field{i}.tif"), (make_field("dark", seed=20 + i) * 65535).astype(np.uint16))
    (raw / "dark" / "notes.txt").write_text("not an image")
    return raw


def test_extract_cells_writes_patches_manifest_and_montage(tmp_path):
    raw = write_raw(tmp_path)
    out = tmp_path / "out"
    res = extract_cells(raw, out, montage_fields=3)
    n = len(CELLS)
    assert res.n_fields == 4 and res.n_patches == 4 * n
    assert res.counts == {"bright": 2 * n, "dark": 2 * n} and res.fields == {"bright": 2, "dark": 2}
    assert res.skipped == [] and res.empty_fields == []

    with res.manifest_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["path", "label", "source", "y0", "x0", "y1", "x1"]
    written = sorted(p.relative_to(out).as_posix() for p in out.glob("*/*.png"))
    assert sorted(r["path"] for r in rows) == written and len(written) == 4 * n
    for r in rows:
        assert r["path"].startswith(r["label"] + "/") and r["source"].startswith(r["label"] + "/")
        assert (raw / r["source"]).is_file()
        assert Path(r["path"]).name.startswith(Path(r["source"]).stem + "_cell")
        assert int(r["y0"]) < int(r["y1"]) and int(r["x0"]) < int(r["x1"])
    bright_patch = np.asarray(Image.open(out / "bright" / "field0_cell1.png"))
    dark_patch = np.asarray(Image.open(out / "dark" / "field0_cell1.png"))
    assert bright_patch.shape == (200, 200, 3) and dark_patch.shape == (200, 200)
    assert bright_patch.dtype == dark_patch.dtype == np.uint8
    top = next(r for r in rows if r["label"] == "dark" and r["y0"] == "0")
    assert (np.asarray(Image.open(out / top["path"]))[:50] == 0).all()  # default padding: constant zeros
    # Colour preserved: the synthetic red channel is the brightest.
    assert bright_patch[..., 0].mean() > bright_patch[..., 2].mean()

    with Image.open(res.montage_path) as im:
        im.verify()
    with Image.open(res.montage_path) as im:
        assert im.mode == "RGB" and min(im.size) > 100
    text = res.summary()
    assert f"{4 * n} cell patches" in text and "bright" in text and "dark" in text and "manifest.csv" in text


def test_unreadable_file_is_skipped_and_reported(tmp_path):
    raw = write_raw(tmp_path)
    (raw / "bright" / "broken.png").write_bytes(b"\x89PNG not really")
    res = extract_cells(raw, tmp_path / "out", montage_fields=0)
    assert res.skipped == [("bright/broken.png", "unreadable")]
    assert res.n_fields == 4 and res.montage_path is None
    assert "broken.png" in res.summary()


def test_out_dir_must_be_empty_unless_overwrite(tmp_path):
    raw = write_raw(tmp_path)
    out = tmp_path / "out"
    first = extract_cells(raw, out, montage_fields=1)
    with pytest.raises(DataError, match="not empty.*overwrite"):
        extract_cells(raw, out)
    (raw / "bright" / "field1.png").unlink()
    again = extract_cells(raw, out, CellParams(patch_size=64), montage_fields=1, overwrite=True)
    assert again.n_patches == first.n_patches - len(CELLS)
    assert len(list(out.glob("*/*.png"))) == again.n_patches  # stale patches removed
    assert Image.open(out / "bright" / "field0_cell1.png").size == (64, 64)


def test_missing_raw_dir(tmp_path):
    with pytest.raises(DataError, match=r"does not exist.*<class>/<image>"):
        extract_cells(tmp_path / "nope", tmp_path / "out")


def test_empty_raw_dir(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(DataError, match=r"no class folders.*empty.*<class>/<image>"):
        extract_cells(tmp_path / "raw", tmp_path / "out")


def test_only_text_files(tmp_path):
    for name in ["a.txt", "b.txt"]:
        (tmp_path / "raw" / "PC3").mkdir(parents=True, exist_ok=True)
        (tmp_path / "raw" / "PC3" / name).write_text("x")
    with pytest.raises(DataError, match=r"no images.*PC3/a\.txt, PC3/b\.txt"):
        extract_cells(tmp_path / "raw", tmp_path / "out")


def test_images_without_class_folder(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(raw / "loose.png")
    with pytest.raises(DataError, match=r"directly in .*no class folder.*<class>/<image>"):
        extract_cells(raw, tmp_path / "out")


def test_all_images_unreadable(tmp_path):
    (tmp_path / "raw" / "A").mkdir(parents=True)
    (tmp_path / "raw" / "A" / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"could be read.*A/x\.png"):
        extract_cells(tmp_path / "raw", tmp_path / "out")


@pytest.mark.parametrize("kwargs, name", [
    ({"block_size": 50}, "block_size"), ({"block_size": 1}, "block_size"), ({"offset": -1}, "offset"),
    ({"min_size": 0}, "min_size"), ({"patch_size": 0}, "patch_size"), ({"polarity": "grey"}, "polarity"),
    ({"open_radius": -1}, "open_radius"), ({"max_cells_per_image": 0}, "max_cells_per_image"),
    ({"pad_mode": "wrap"}, "pad_mode"), ({"block_size": 51.0}, "block_size"),
])
def test_bad_params_name_the_parameter_and_range(kwargs, name):
    with pytest.raises(DataError, match=name) as err:
        CellParams(**kwargs)
    msg = str(err.value)
    assert "\n" not in msg and ("use" in msg)


def test_even_block_size_suggests_a_fix():
    with pytest.raises(DataError, match=r"block_size=50 is even.*odd.*51"):
        CellParams(block_size=50)


def test_real_cell_lines(tmp_path):
    if not REAL.is_dir():
        pytest.skip(f"real cell-line images not present at {REAL}")
    raw = tmp_path / "raw"
    classes = sorted(d for d in REAL.iterdir() if d.is_dir())
    assert classes
    for d in classes:
        (raw / d.name).mkdir(parents=True)
        for f in sorted(d.glob("*.png"))[:2]:
            shutil.copy(f, raw / d.name / f.name)
    res = extract_cells(raw, tmp_path / "out")
    assert res.n_fields == 2 * len(classes) and res.empty_fields == []
    with res.manifest_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    per_field = {r["source"] for r in rows}
    assert len(per_field) == res.n_fields  # >= 1 patch in every field
    for r in rows:
        assert Image.open(tmp_path / "out" / r["path"]).size == (200, 200)
