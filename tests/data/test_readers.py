"""The reader registry: each file goes to the reader of its format (by name, magic or header), unknown names are
one line listing the valid ones, and whole slides in class folders get the hint to tile them."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from oncotransfer.data import readers
from oncotransfer.data.inspect import inspect_dataset
from oncotransfer.errors import ConfigError
from slidegen import Mosaic, stain_images, write_slide

REAL = Path(__file__).parents[2].parent / "shared" / "data" / "real-files"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/real-files is not here")


def pyramid(path: Path) -> Path:
    mosaic = Mosaic(stain_images(2, 128), np.array([[0, 1], [1, 0]]), 128)
    return write_slide(path, mosaic, 256, 256, levels=2, tile=128, compression=None)


def test_unknown_reader_lists_the_registered_ones():
    assert list(readers.READERS)[-1] == "pillow"  # the catch-all is asked last
    with pytest.raises(ConfigError, match=r"unknown reader 'dicm'; did you mean \['dicom'\]\? \(registered: slide, dicom"):
        readers.get_reader("dicm")


def test_each_file_goes_to_its_format_reader(tmp_path):
    from pydicom.data import get_testdata_file
    Image.new("RGB", (20, 10), (200, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (20, 10)).save(tmp_path / "flat.tif")
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "no_suffix")  # recognised by its DICM magic
    pyramid(tmp_path / "slide.tif")
    assert readers.reader_for(tmp_path / "a.png").name == "pillow"
    assert readers.reader_for(tmp_path / "flat.tif").name == "pillow"  # a plain TIFF is a picture
    assert readers.reader_for(tmp_path / "no_suffix").name == "dicom"
    assert readers.reader_for(tmp_path / "slide.tif").name == "slide"  # a pyramidal TIFF is a slide
    head = readers.probe(tmp_path / "a.png")
    assert (head.reader, head.kind, head.width, head.height, head.mode) == ("pillow", "image", 20, 10, "RGB")
    head = readers.probe(tmp_path / "no_suffix")
    assert (head.reader, head.width, head.height, head.frames) == ("dicom", 128, 128, 1) and head.group.startswith("p-")
    head = readers.probe(tmp_path / "slide.tif")
    assert (head.reader, head.kind, head.width, head.frames, head.mpp) == ("slide", "slide", 256, 2, 0.25)
    with pytest.raises(readers.ImageReadError, match="a folder, not an image file"):
        readers.reader_for(tmp_path)


@needs_real
def test_real_slides_and_dicom_wsi_are_slides():
    assert readers.reader_for(REAL / "slides" / "CMU-1-Small-Region.svs").name == "slide"
    assert readers.reader_for(REAL / "slides" / "openslide-fixtures" / "boxes_0.dcm").name == "slide"
    assert readers.reader_for(REAL / "slides" / "openslide-fixtures" / "boxes.tiff").name == "slide"
    assert readers.reader_for(REAL / "dicom" / "US1_UNCR.dcm").name == "dicom"  # not every .dcm is a slide


def test_a_whole_slide_in_a_class_folder_is_named_with_the_hint_to_tile_it(tmp_path):
    for c, value in (("a", 40), ("b", 200)):
        for i in range(2):
            (tmp_path / c).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), (value + i, 0, 0)).save(tmp_path / c / f"{i}.png")
    pyramid(tmp_path / "a" / "scan.tif")
    (tmp_path / "b" / "scan2.svs").write_bytes((tmp_path / "a" / "scan.tif").read_bytes())  # vendor suffix
    rep = inspect_dataset(tmp_path)
    assert set(rep.unreadable) == {"a/scan.tif", "b/scan2.svs"}
    assert all("slides tile" in why for why in rep.unreadable.values()), rep.unreadable
    with pytest.raises(readers.ImageReadError, match="whole-slide image: cut it into tissue tiles"):
        readers.open_rgb(tmp_path / "a" / "scan.tif")


def test_files_without_a_suffix_are_read_by_signature_or_named(tmp_path):
    """PACS exports name objects without a suffix: DICOM without its preamble and images are read by their
    signature; a suffix-less file no reader knows (an object truncated inside its header) is named, not lost."""
    import pydicom
    from pydicom.data import get_testdata_file
    from oncotransfer.data.manifest import load_manifest
    for c, value in (("a", 40), ("b", 200)):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.new("RGB", (32, 32), (value + i, 0, 0)).save(tmp_path / c / f"{i}.png")
    ct = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(ct)
    ds.preamble = None
    del ds.file_meta
    ds.save_as(tmp_path / "a" / "raw_object", enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert (tmp_path / "a" / "raw_object").read_bytes()[128:132] != b"DICM"
    # truncated inside its preamble (rtplan.dcm's is zeros; CT_small's holds a TIFF header, read as one)
    (tmp_path / "a" / "cut_object").write_bytes(Path(get_testdata_file("rtplan.dcm")).read_bytes()[:100])
    Image.new("RGB", (32, 32), (90, 0, 0)).save(tmp_path / "b" / "IM0001", format="PNG")
    (tmp_path / "b" / "notes.txt").write_text("not data")
    m = load_manifest(tmp_path)
    names = sorted(Path(p).name for p in m.paths)
    assert names == ["0.png", "0.png", "1.png", "1.png", "IM0001", "raw_object"]
    assert list(map(lambda p: Path(p).name, m.skipped)) == ["cut_object"]
    assert "no DICOM or image signature" in m.skipped[str(tmp_path / "a" / "cut_object")]
    assert readers.probe(tmp_path / "a" / "raw_object").reader == "dicom"
    rep = inspect_dataset(tmp_path)
    assert "a/cut_object" in rep.unreadable and not set(rep.unreadable) - {"a/cut_object"}
