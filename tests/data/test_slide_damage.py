"""Damaged slides and slide tables (issue 22): a corrupt tile at level 0 or in the thumbnail level, a truncated
TIFF, an IFD chain that loops, a damaged tiling.json and bad labels CSVs are each one line naming the damage;
in a folder the damaged slide fails (or is skipped) by name and the others are still tiled."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from oncotransfer.data import slides as S
from oncotransfer.data.readers.tiffcheck import check_tiff
from oncotransfer.errors import DataError
from oncotransfer.infer.slides import training_tiling
from slidedamage import corrupt_tile, ifd_loop, truncate
from slidegen import Mosaic, stain_images, write_slide


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """4608 x 512 px of tissue at 0.25 µm/px, two levels: at 0.25 µm/px tiles come from level 0 and the
    thumbnail (2048 px) from level 1, the lowest."""
    m = Mosaic(stain_images(4, 512), np.array([[0, 1, 2, 3, 0, 1, 2, 3, 0]]), 512)
    h, w = m.shape
    return write_slide(tmp_path_factory.mktemp("wide") / "wide.tif", m, w, h, mpp=0.25, levels=2)


def damaged(wide: Path, folder: Path, name: str, damage) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = shutil.copy(wide, folder / f"{name}.tif")
    damage(Path(p))
    return Path(p)


def test_a_corrupt_level_0_tile_fails_its_slide_by_position_and_the_others_are_tiled(wide, tmp_path):
    src = tmp_path / "src"
    damaged(wide, src, "bad", lambda p: corrupt_tile(p, 0, 5))
    shutil.copy(wide, src / "good.tif")
    lines: list[str] = []
    r = S.tile_slides(src, tmp_path / "out", mpp=0.25, log=lines.append)
    assert [s["slide"] for s in r.slides] == ["good"] and r.slides[0]["tiles"] == 40
    (why,) = r.failed.values()
    assert "bad.tif" in why and "cannot read the tile at (" in why
    assert not (tmp_path / "out" / "tiles" / "bad").exists(), "a failed slide's partial tiles are orphans"
    assert json.loads((tmp_path / "out" / "tiling.json").read_text())["failed"] == r.failed
    assert any(line.startswith("failed: ") and "bad.tif" in line for line in lines)


def test_a_corrupt_thumbnail_level_tile_is_one_line(wide, tmp_path):
    bad = damaged(wide, tmp_path, "thumb", lambda p: corrupt_tile(p, -1, 2))
    with pytest.raises(S.SlideError, match="thumb.tif: cannot read its thumbnail"):
        S.tile_slides(bad, tmp_path / "out", mpp=0.25)


@pytest.mark.parametrize("fraction", [0.02, 0.3, 0.6, 0.9, 0.999])
def test_a_truncated_tiff_is_one_line_before_any_tile_is_read(wide, tmp_path, fraction):
    bad = damaged(wide, tmp_path, "cut", lambda p: truncate(p, fraction))
    with pytest.raises(S.SlideError, match="cut.tif: (truncated TIFF|not a slide)"):
        S.tile_slides(bad, tmp_path / "out", mpp=0.25)


@pytest.mark.parametrize("back_to", [0, 1])
def test_an_ifd_loop_is_an_error_alone_and_a_named_skip_in_a_folder(wide, tmp_path, back_to):
    bad = damaged(wide, tmp_path / "src", "loop", lambda p: ifd_loop(p, back_to))
    with pytest.raises(S.SlideError, match=f"loop.tif: damaged TIFF: its directory chain loops back to IFD {back_to}"):
        S.tile_slides(bad, tmp_path / "out", mpp=0.25)
    shutil.copy(wide, tmp_path / "src" / "good.tif")
    lines: list[str] = []
    r = S.tile_slides(tmp_path / "src", tmp_path / "out2", mpp=0.25, log=lines.append)
    assert [s["slide"] for s in r.slides] == ["good"]
    reasons = {**r.failed, **json.loads((tmp_path / "out2" / "tiling.json").read_text())["skipped"]}
    assert "loops back" in reasons[str(bad)]


def test_whole_real_slides_pass_the_structure_check(wide):
    check_tiff(wide)
    real = Path(__file__).parents[2].parent / "shared" / "data" / "real-files" / "slides"
    for f in sorted(real.rglob("*.svs")) + sorted(real.rglob("*.ndpi")) + sorted(real.rglob("*.tiff")):
        check_tiff(f)


@pytest.fixture()
def folder(wide, tmp_path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for n in ("s1", "s2"):
        shutil.copy(wide, src / f"{n}.tif")
    return src


@pytest.mark.parametrize("csv,needle", [
    ("slide,label\ns1,a\ns2,b\nghost,a\nphantom.svs,b\n", r"\['ghost', 'phantom'\] are not in"),
    ("slide,label\ns1,a\ns2,b\ns1.tif,b\n", "lines 2 and 4 give slide 's1' conflicting rows"),
    ("slide,label,patient\ns1,a,p1\ns2,b,p2\ns1,a,p9\n", "lines 2 and 4 give slide 's1' conflicting rows"),
    ("slide,label\ns1,\ns2,b\n,a\n", r"empty slide or label cell on line\(s\) 2, 4"),
])
def test_bad_labels_csvs_are_one_line_naming_slides_or_lines(folder, tmp_path, csv, needle):
    labels = tmp_path / "labels.csv"
    labels.write_text(csv)
    with pytest.raises(DataError, match=needle):
        S.tile_slides(folder, tmp_path / "out", mpp=0.25, labels=labels)
    assert not (tmp_path / "out").exists()


def test_repeated_identical_label_rows_are_accepted_and_one_slide_may_use_a_cohort_csv(folder, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\ns1,a\ns2,b\ns1.tif,a\nother,b\n")
    r = S.tile_slides(folder / "s1.tif", tmp_path / "out", mpp=0.25, labels=labels)
    assert r.slides[0]["tiles"] == 40


@pytest.mark.parametrize("text,needle", [
    ("{not json", "damaged tiling.json"), ("[1, 2]", "not an object"), ('{"tile_size": "224"}', "tile_size"),
    ('{"tile_size": 0}', "tile_size is 0"), ('{"mpp": -0.5}', "mpp is -0.5"), ('{"min_tissue": 3}', "min_tissue"),
    ('{"tissue": "neon"}', "tissue"), ('{"slides": [{"mpp": "x"}]}', "slides"), ('{"slides": [1]}', "slides"),
    ('{"tile_size": true}', "tile_size"), ("", "damaged tiling.json"),
])
def test_a_damaged_tiling_json_is_one_line_for_predict_not_the_defaults(tmp_path, text, needle):
    (tmp_path / "manifest.csv").write_text("path,label\n")
    (tmp_path / "tiling.json").write_text(text)
    meta = {"config": {"data": {"path": str(tmp_path / "manifest.csv")}}}
    with pytest.raises(DataError, match=needle) as e:
        training_tiling(meta)
    assert "tiling.json" in str(e.value) and "\n" not in str(e.value)


def test_a_whole_tiling_json_is_read_and_a_missing_one_is_the_defaults(tmp_path):
    meta = {"config": {"data": {"path": str(tmp_path)}}}
    assert training_tiling(meta) == {}
    good = {"tile_size": 224, "mpp": 0.5, "magnification": None, "min_tissue": 0.5, "tissue": "auto",
            "slides": [{"mpp": 0.5}]}
    (tmp_path / "tiling.json").write_text(json.dumps(good))
    assert training_tiling(meta) == good
