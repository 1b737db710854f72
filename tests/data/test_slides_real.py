"""Slides from real scanners (../shared/data/real-files/slides, issue 19) and the defects they showed: corrupt
slides as one line, fluorescence tissue, implausible resolutions, slides too small for a tile, DICOM whole-slide
series found once. Synthetic twins cover what does not need the real files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from oncotransfer.data import slides as S
from oncotransfer.data.tissue import detect_mode, tissue_mask
from slidegen import Mosaic, write_slide

SHARED = Path(__file__).parents[2].parent / "shared" / "data" / "real-files"
SLIDES = SHARED / "slides"
FIX = SLIDES / "openslide-fixtures"
real = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/real-files is absent")
LAYOUT = np.array([[-1, 0, 1, -1],
                   [0, 1, -1, -1],
                   [-1, -1, -1, 0]])


def stained_slide(path: Path) -> Path:
    """A 1024 x 768 brightfield slide (0.25 µm/px): pink cells with purple nuclei on white glass."""
    rng = np.random.default_rng(1)
    cells = [np.clip(np.array(c, np.float32) + rng.normal(0, 8, (256, 256, 3)), 0, 255).astype(np.uint8)
             for c in ((225, 140, 185), (110, 60, 150))]
    return write_slide(path, Mosaic(cells, LAYOUT, 256), 1024, 768, mpp=0.25, levels=3)


def fluorescence_slide(path: Path) -> Path:
    """A dark-field twin of the DAPI slide: black glass with a blue cast (0, 0, 3) and cells of faint blue
    tissue (0, 0, 14) holding bright nuclei (0, 0, 200); the glass's blue cast saturates HSV like stain does."""
    rng = np.random.default_rng(2)
    cells = []
    for _ in range(2):
        a = np.zeros((256, 256, 3), np.float32)
        a[..., 2] = 14
        yy, xx = np.mgrid[:256, :256]
        for cy, cx in rng.integers(8, 248, (25, 2)):
            a[(yy - cy) ** 2 + (xx - cx) ** 2 < 36, 2] = 200
        a[..., 2] += rng.normal(0, 2, (256, 256))
        cells.append(a.clip(0, 255).astype(np.uint8))
    mosaic = Mosaic(cells, LAYOUT, 256)

    def region(d, y0, x0, h, w):
        out = mosaic(d, y0, x0, h, w)
        out[(out == 255).all(-1)] = (0, 0, 3)  # the mosaic's white glass, made dark
        return out
    return write_slide(path, region, 1024, 768, mpp=0.25, levels=3, compression=None)


def on_cells(coords, cell: int = 256) -> set[tuple[int, int]]:
    return {(x // cell, y // cell) for x, y, _ in coords}


CELLS = {(int(q), int(r)) for r, q in np.argwhere(LAYOUT >= 0)}


def test_a_dark_background_slide_gets_the_fluorescence_mask(tmp_path):
    path = fluorescence_slide(tmp_path / "fluo.tif")
    s = S.open_slide(path)
    thumb = S.thumbnail(s)
    assert detect_mode(thumb) == "fluorescence"
    geom = S.plan(s, path, tile_size=64, mpp=0.5)
    mask, thr, mode = tissue_mask(thumb)
    assert mode == "fluorescence" and 8 <= thr <= 12
    coords = S.tissue_tiles(geom, mask, 0.5)
    assert on_cells(coords) == CELLS and len(coords) == 5 * 4  # every tile of the five cells, none on glass
    bright = S.tissue_tiles(geom, tissue_mask(thumb, "brightfield")[0], 0.5)
    assert len(bright) == 48  # the brightfield mask takes the blue-cast glass for stain: every tile
    result = S.tile_slides(path, tmp_path / "out", tile_size=64)
    info = json.loads((tmp_path / "out" / "tiling.json").read_text())
    assert info["tissue"] == "auto" and info["slides"][0]["tissue"] == "fluorescence"
    assert result.slides[0]["tiles"] == 20


def test_tissue_mode_is_checked_and_brightfield_stays_brightfield(tmp_path):
    from oncotransfer.errors import ConfigError
    path = stained_slide(tmp_path / "he.tif")
    thumb = S.thumbnail(S.open_slide(path))
    assert tissue_mask(thumb)[2] == "brightfield"
    with pytest.raises(ConfigError, match="--tissue"):
        S.tile_slides(path, tmp_path / "out", tissue="darkfield")


def test_mpp_source_wins_over_the_files_resolution_and_is_recorded(tmp_path):
    path = stained_slide(tmp_path / "he.tif")  # the file says 0.25 µm/px
    s = S.open_slide(path)
    g = S.plan(s, path, tile_size=64, mpp=0.5, mpp_source=0.5)
    assert (g.mpp0, g.mpp0_source, g.downsample, g.size0) == (0.5, "--mpp-source", 1.0, 64.0)
    assert "0.25" in g.mpp0_ignored
    g = S.plan(s, path, tile_size=64, mpp=0.5)
    assert (g.mpp0, g.mpp0_source, g.mpp0_ignored) == (pytest.approx(0.25), "metadata", None)
    with pytest.raises(S.SlideError, match="give the right --mpp-source"):  # not "ask for a coarser --mpp"
        S.plan(s, path, tile_size=64, mpp=0.5, mpp_source=2.0)


def test_a_slide_smaller_than_one_tile_is_an_error_not_zero_tiles(tmp_path):
    path = stained_slide(tmp_path / "he.tif")
    with pytest.raises(S.SlideError, match=r"1024 x 768 px is smaller than one 512 px tile at 1 µm/px"):
        S.tile_slides(path, tmp_path / "out", tile_size=512, mpp=1.0)


@real
def test_real_thumbnails_brightfield_and_fluorescence_tissue_fractions():
    """Measured (the masks drawn and looked at): the CMU H&E keeps its 0.34 brightfield tissue; the DAPI slide,
    all 'tissue' under the brightfield mask, is 0.70 with the fluorescence one, its black corners left out."""
    cmu = S.thumbnail(S.open_slide(SLIDES / "CMU-1-Small-Region.svs"))
    mask, _, mode = tissue_mask(cmu)
    assert mode == "brightfield" and 0.31 < mask.mean() < 0.37
    dapi = S.thumbnail(S.open_slide(SLIDES / "test3-DAPI-2-(387).ndpi"))
    assert tissue_mask(dapi, "brightfield")[0].mean() > 0.99  # the defect issue 19 found
    mask, thr, mode = tissue_mask(dapi)
    assert mode == "fluorescence" and 0.6 < mask.mean() < 0.8
    h, w = mask.shape
    k = h // 20
    for corner in (mask[:k, :k], mask[:k, -k:], mask[-k:, :k], mask[-k:, -k:]):
        assert not corner.any()  # black glass in every corner
    assert mask[int(0.75 * h):int(0.85 * h), int(0.1 * w):int(0.9 * w)].mean() > 0.95  # the dense band


@real
def test_real_dapi_slide_tiles_on_tissue_only(tmp_path, monkeypatch, capsys):
    from test_cli import run_main
    code, out, err = run_main(monkeypatch, capsys, "slides", "tile", str(SLIDES / "test3-DAPI-2-(387).ndpi"),
                              str(tmp_path / "out"), "--mpp", "2", "--tile-size", "64")
    assert code == 0 and "fluorescence tissue mask" in err
    info = json.loads((tmp_path / "out" / "tiling.json").read_text())["slides"][0]
    assert info["tissue"] == "fluorescence" and 0.6 < info["tissue_fraction"] < 0.8
    assert 0.5 * info["grid_tiles"] < info["tiles"] < 0.9 * info["grid_tiles"]


@real
def test_corrupt_slides_in_a_folder_are_listed_and_the_good_one_is_tiled(tmp_path, monkeypatch, capsys):
    from test_cli import run_main
    src = tmp_path / "slides"
    src.mkdir()
    stained_slide(src / "good.tif")
    for name in ("unreadable.svs", "unopenable.tiff"):
        shutil.copy(FIX / name, src / name)
    # 16 px tiles at the fixtures' own 0.499 µm/px: one tile fits, so the corrupt pixels are read
    code, out, err = run_main(monkeypatch, capsys, "slides", "tile", str(src), str(tmp_path / "out"),
                              "--tile-size", "16", "--mpp", "0.499")
    assert code == 1 and "Traceback" not in err
    bad = str(src / "unreadable.svs")
    assert f"failed: {bad}: cannot read its thumbnail (OpenSlideError: Bogus marker length)" in err.splitlines()
    tiling = json.loads((tmp_path / "out" / "tiling.json").read_text())
    assert list(tiling["failed"]) == [bad] and "Bogus marker length" in tiling["failed"][bad]
    assert list(tiling["skipped"]) == [str(src / "unopenable.tiff")]  # a 1 x 1 flat TIFF is not a slide
    df = pd.read_csv(tmp_path / "out" / "manifest.csv")
    assert set(df.slide) == {"good"} and len(df) > 0
    with pytest.raises(S.SlideError, match="unreadable.svs: cannot read its thumbnail"):
        S.thumbnail(S.open_slide(src / "unreadable.svs"), path=src / "unreadable.svs")


@real
def test_real_unopenable_tiff_alone_is_one_line(tmp_path, monkeypatch, capsys):
    from test_cli import assert_one_line_error, run_main
    code, _, err = run_main(monkeypatch, capsys, "slides", "tile", str(FIX / "unopenable.tiff"),
                            str(tmp_path / "out"), "--tile-size", "16")
    assert_one_line_error(code, err, "unopenable.tiff")


@real
def test_real_72_dpi_tiff_needs_mpp_source_and_tiles_with_it(tmp_path, monkeypatch, capsys):
    from test_cli import assert_one_line_error, run_main
    code, _, err = run_main(monkeypatch, capsys, "slides", "tile", str(FIX / "boxes.tiff"), str(tmp_path / "a"))
    assert_one_line_error(code, err, "boxes.tiff", "352.8 µm/px", "72 pixels per inch", "--mpp-source")
    code, out, err = run_main(monkeypatch, capsys, "slides", "tile", str(FIX / "boxes.tiff"), str(tmp_path / "b"),
                              "--mpp-source", "0.5", "--tile-size", "16")
    assert code == 0 and "Traceback" not in err
    info = json.loads((tmp_path / "b" / "tiling.json").read_text())["slides"][0]
    assert (info["mpp0"], info["mpp0_source"]) == (0.5, "--mpp-source") and "352.8" in info["mpp0_ignored"]
    assert info["tiles"] > 0 and info["grid_tiles"] == (300 // 16) * (250 // 16)


@real
@pytest.mark.parametrize("name", ["small.svs", "boxes_0.dcm"])
def test_real_slides_too_small_for_a_tile_fail(tmp_path, monkeypatch, capsys, name):
    from test_cli import assert_one_line_error, run_main
    code, _, err = run_main(monkeypatch, capsys, "slides", "tile", str(FIX / name), str(tmp_path / "out"))
    assert_one_line_error(code, err, name, "16 x 16 px is smaller than one 224 px tile")


@real
def test_find_slides_takes_dicom_whole_slide_series_once_and_no_plain_dicom(tmp_path):
    skipped: dict[str, str] = {}
    found = S.find_slides(FIX, skipped)
    assert [f.name for f in found] == ["boxes.tiff", "boxes_0.dcm", "small.svs", "unreadable.svs"]
    assert set(skipped) == {str(FIX / "boxes_1.dcm"), str(FIX / "unopenable.tiff")}
    assert "series of boxes_0.dcm" in skipped[str(FIX / "boxes_1.dcm")]
    # A DICOM folder: the whole-slide pair (one slide) among plain DICOM images, which are not slides.
    folder = tmp_path / "dicom"
    folder.mkdir()
    for f in ("boxes_1.dcm", "boxes_0.dcm"):
        shutil.copy(FIX / f, folder / f)
    for f in ("SC_rgb.dcm", "US1_UNCR.dcm"):
        shutil.copy(SHARED / "dicom" / f, folder / f)
    skipped = {}
    assert [f.name for f in S.find_slides(folder, skipped)] == ["boxes_0.dcm"]
    assert "not a whole-slide image" in skipped[str(folder / "SC_rgb.dcm")]
    only_plain = tmp_path / "plain"
    only_plain.mkdir()
    shutil.copy(SHARED / "dicom" / "SC_rgb.dcm", only_plain / "x.dcm")
    with pytest.raises(S.DataError, match="no slides found"):
        S.find_slides(only_plain)
