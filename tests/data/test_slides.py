"""Whole-slide tiling on real pyramidal TIFF files written with tifffile: tissue found, glass skipped, tiles
where they should be at the asked resolution, labels and patients carried into a manifest that splits by slide."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from oncotransfer.data import slides as S
from oncotransfer.errors import ConfigError, DataError
from slidegen import Mosaic, stain_images, write_slide

SHARED = Path(__file__).parents[2].parent / "shared" / "data" / "osteosarcoma-tcia-60"
# 4 x 3 cells of 256 px at 0.25 µm/px: 5 stained cells, 7 of glass.
LAYOUT = np.array([[-1, 0, 1, -1],
                   [2, 3, -1, -1],
                   [-1, -1, -1, 0]])


def synthetic(path: Path, mpp: float | None = 0.25, layout: np.ndarray = LAYOUT, images=None) -> Mosaic:
    mosaic = Mosaic(images if images is not None else stain_images(4, 256), layout, 256)
    h, w = mosaic.shape
    write_slide(path, mosaic, w, h, mpp=mpp, levels=3, compression=None)  # lossless: pixels can be compared
    return mosaic


def cell_origins(layout: np.ndarray, cell: int, size0: int) -> set[tuple[int, int]]:
    """Level-0 tile origins that tile the stained cells exactly (``cell`` a multiple of ``size0``)."""
    out = set()
    for r, q in np.argwhere(layout >= 0):
        for dy in range(0, cell, size0):
            for dx in range(0, cell, size0):
                out.add((int(q * cell + dx), int(r * cell + dy)))
    return out


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory) -> tuple[Path, Mosaic]:
    p = tmp_path_factory.mktemp("wsi") / "syn.tif"
    return p, synthetic(p)


def test_openslide_reads_the_pyramid_and_its_resolution(slide_path):
    path, _ = slide_path
    s = S.open_slide(path)
    assert s.dimensions == (1024, 768)
    assert list(s.level_downsamples) == [1.0, 2.0, 4.0]
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)


def test_tissue_found_glass_skipped_and_tiles_exactly_on_the_stained_cells(slide_path):
    path, mosaic = slide_path
    s = S.open_slide(path)
    geom = S.plan(s, path, tile_size=64, mpp=0.5)
    assert (geom.downsample, geom.size0, geom.level, geom.read) == (2.0, 128.0, 1, 64)  # read at level 1, no resize
    coords = S.tissue_tiles(geom, S.tissue_mask(S.thumbnail(s))[0], 0.5)
    assert {(x, y) for x, y, _ in coords} == cell_origins(LAYOUT, 256, 128)  # 5 cells x 4 tiles, no glass
    x, y, _ = coords[0]
    tile = np.asarray(S.read_tile(s, geom, x, y))
    # Level 1 of the file is the mosaic at downsample 2: the tile is exactly that region.
    assert np.array_equal(tile, mosaic(2, y // 2, x // 2, 64, 64))


def test_mpp_scaling_picks_the_pyramid_level_and_magnification_uses_10_over_mag(slide_path):
    path, mosaic = slide_path
    s = S.open_slide(path)
    g1 = S.plan(s, path, tile_size=64, mpp=1.0)
    assert (g1.size0, g1.level, g1.read) == (256.0, 2, 64)
    coords = S.tissue_tiles(g1, S.tissue_mask(S.thumbnail(s))[0], 0.5)
    assert {(x, y) for x, y, _ in coords} == cell_origins(LAYOUT, 256, 256)
    g_mag = S.plan(s, path, tile_size=64, magnification=20)  # no objective power recorded: 10 / 20 µm/px
    assert g_mag.mpp == pytest.approx(0.5) and g_mag.size0 == 128
    g3 = S.plan(s, path, tile_size=50, mpp=0.75)  # downsample 3: best level 1 (2x), read 75 px, resized to 50
    assert (g3.level, g3.read) == (1, 75)
    assert S.read_tile(s, g3, 0, 0).size == (50, 50)
    with pytest.raises(S.SlideError, match="coarser"):
        S.plan(s, path, tile_size=64, mpp=0.1)
    with pytest.raises(ConfigError, match="not both"):
        S.plan(s, path, mpp=0.5, magnification=20)


def test_a_slide_without_resolution_is_one_line_unless_mpp_source_is_given(tmp_path):
    path = tmp_path / "nompp.tif"
    synthetic(path, mpp=None)
    with pytest.raises(S.SlideError, match="--mpp-source") as e:
        S.tile_slides(path, tmp_path / "out", tile_size=64)
    assert "\n" not in str(e.value)
    result = S.tile_slides(path, tmp_path / "out", tile_size=64, mpp_source=0.25)
    info = json.loads((tmp_path / "out" / "tiling.json").read_text())["slides"][0]
    assert info["mpp0_source"] == "--mpp-source" and info["tiles"] == 20 == result.slides[0]["tiles"]


def test_tile_slides_writes_tiles_thumbnails_and_a_manifest_that_trains_grouped_by_slide(tmp_path):
    from oncotransfer.config import SplitConfig
    from oncotransfer.data.manifest import load_manifest
    from oncotransfer.data.splits import make_split
    src = tmp_path / "slides"
    src.mkdir()
    base = stain_images(4, 256)
    rng = np.random.default_rng(0)
    for k in range(6):  # each slide its own noise (no identical tiles across slides); b darker than a
        images = [np.clip(im + rng.integers(-3, 4, im.shape), 0, 255).astype(np.uint8) for im in base]
        synthetic(src / f"s{k}.tif", images=images[1::2] * 2 if k % 2 else images[::2] * 2)
    (src / "broken.svs").write_bytes(b"not a slide at all")
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label,patient\n" + "".join(
        f"s{k}.tif,{'b' if k % 2 else 'a'},{'P1' if k == 1 else ''}\n" for k in range(6)) + "broken,a,\n")
    result = S.tile_slides(src, tmp_path / "out", tile_size=64, labels=labels)
    assert list(result.failed) == [str(src / "broken.svs")] and "not a slide" in result.failed[str(src / "broken.svs")]
    df = pd.read_csv(tmp_path / "out" / "manifest.csv", dtype=str, keep_default_na=False)
    assert list(df.columns[:6]) == ["path", "label", "slide", "patient", "x", "y"]
    assert len(df) == 6 * 20
    assert set(df.loc[df.slide == "s1", "patient"]) == {"P1"} and set(df.loc[df.slide == "s2", "patient"]) == {"s2"}
    assert (df.groupby("slide")["label"].first() == pd.Series({f"s{k}": "b" if k % 2 else "a" for k in range(6)})).all()
    tile = Image.open(tmp_path / "out" / df.path[0])
    assert tile.size == (64, 64) and tile.mode == "RGB"
    for k in range(6):
        thumb = Image.open(tmp_path / "out" / "thumbnails" / f"s{k}.png")
        assert thumb.size == (1024, 768)
        assert np.asarray(thumb)[0, 256 + 1].tolist() == [0, 160, 0]  # the first kept tile's outline
    m = load_manifest(tmp_path / "out")
    assert m.classes == ["a", "b"] and len(m) == 120 and set(m.patients) == {"s0", "P1", "s2", "s3", "s4", "s5"}
    split = make_split(m, SplitConfig(kind="kfold", folds=3, val_size=0.0))
    assert split.grouped_by == "patient"
    for f in split.folds:
        assert not set(m.patients[f.train]) & set(m.patients[f.test])
    with pytest.raises(DataError, match="exists"):
        S.tile_slides(src, tmp_path / "out", tile_size=64, labels=labels)


def test_labels_csv_must_cover_every_slide(tmp_path, slide_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("slide,label\nother,a\n")
    with pytest.raises(DataError, match="no label for slide"):
        S.tile_slides(slide_path[0], tmp_path / "out", labels=labels)


def test_a_corrupt_slide_given_alone_is_one_cli_line(tmp_path, monkeypatch, capsys):
    from test_cli import assert_one_line_error, run_main
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00" + b"\x00" * 64)
    code, _, err = run_main(monkeypatch, capsys, "slides", "tile", str(bad), str(tmp_path / "out"))
    assert_one_line_error(code, err, "bad.tif", "not a slide")


@pytest.mark.skipif(not (SHARED / "manifest.csv").is_file(), reason="../shared/data is absent")
def test_real_osteosarcoma_tiles_on_glass(tmp_path):
    """Real H&E tiles (TCIA osteosarcoma, JPEG-compressed like a scanner's) on a white slide: every kept tile
    lies on tissue, the dense cells are found, and pure glass gives no tile."""
    files = sorted(SHARED.rglob("*.jpg"))[::9][:6]
    images = [np.asarray(Image.open(f).convert("RGB").resize((512, 512))) for f in files]
    layout = np.array([[0, -1, 1], [-1, 2, 3], [4, -1, 5]])
    mosaic = Mosaic(images, layout, 512)
    path = write_slide(tmp_path / "osteo.tif", mosaic, 1536, 1536, mpp=0.25, levels=3, compression="jpeg")
    result = S.tile_slides(path, tmp_path / "out", tile_size=64, mpp=0.5)
    df = pd.read_csv(result.manifest)
    cells = {(int(x) // 512, int(y) // 512) for x, y in zip(df.x, df.y)}
    tissue = {(int(q), int(r)) for r, q in np.argwhere(layout >= 0)}
    assert cells <= tissue
    per_cell = 16  # (512 / 128) ** 2 tiles of 128 level-0 px in a cell
    assert len(df) >= 0.5 * per_cell * len(tissue)
    assert result.slides[0]["grid_tiles"] == 144


def test_a_flat_gigapixel_image_is_refused_before_it_is_decoded_whole(tmp_path):
    """A single-level 9000 px TIFF has no low-resolution level for the tissue mask: one line saying how to fix."""
    path = write_slide(tmp_path / "flat.tif", lambda d, y0, x0, h, w: np.full((h, w, 3), 200, np.uint8),
                       9000, 512, mpp=0.25, levels=1, compression="jpeg")
    with pytest.raises(S.SlideError, match="no pyramid"):
        S.plan(S.open_slide(path), path)


def test_a_subifd_pyramid_is_read_by_tiffslide_with_its_levels_and_resolution(tmp_path):
    """OpenSlide sees only level 0 of a SubIFD pyramid; tiffslide, the fallback, reads its levels and mpp."""
    import tifffile
    import tiffslide
    mosaic = Mosaic(stain_images(4, 256), LAYOUT, 256)
    path = tmp_path / "subifd.tif"
    with tifffile.TiffWriter(path) as tif:
        for k in range(3):
            d = 2 ** k
            kw = {"subifds": 2} if k == 0 else {"subfiletype": 1}
            tif.write(mosaic(d, 0, 0, 768 // d, 1024 // d), tile=(128, 128), photometric="rgb",
                      resolution=(1e4 / (0.25 * d),) * 2, resolutionunit="CENTIMETER", **kw)
    s = S.open_slide(path)
    assert isinstance(s, tiffslide.TiffSlide) and s.level_count == 3
    result = S.tile_slides(path, tmp_path / "out", tile_size=64, mpp=0.5)
    geom = result.slides[0]
    assert (geom["mpp0"], geom["level"], geom["tiles"]) == (pytest.approx(0.25), 1, 20)


def test_without_a_slide_reader_the_error_names_the_extra(tmp_path, monkeypatch, slide_path):
    import sys
    monkeypatch.setitem(sys.modules, "openslide", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "tiffslide", None)
    from oncotransfer.errors import MissingExtraError
    with pytest.raises(MissingExtraError, match=r"oncotransfer\[slides\]"):
        S.open_slide(slide_path[0])
