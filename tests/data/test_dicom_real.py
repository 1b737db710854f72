"""DICOM from real scanners: palettes in either byte order, objects that are not images, blank decodes, and
ultrasound image regions (banners and burned-in text outside them)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file  # noqa: E402

from oncotransfer.data.readers import ImageReadError, open_rgb  # noqa: E402
from oncotransfer.data.readers import dicom as D  # noqa: E402
from oncotransfer.data.readers.quality import blank_reason  # noqa: E402
from oncotransfer.data.readers.us_region import region_box  # noqa: E402

REAL = Path(__file__).parents[2].parent / "shared" / "data" / "real-files"
REAL_DICOM = REAL / "dicom"
needs_real = pytest.mark.skipif(not REAL_DICOM.is_dir(), reason="../shared/data/real-files is absent")


@pytest.fixture(scope="module", autouse=True)
def salt():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ONCOTRANSFER_ID_SALT", "tests-salt-of-16+bytes")
        yield


def pixels(path, **kw) -> np.ndarray:
    return np.asarray(open_rgb(path, **kw))


def _dataset(sop_class, modality: str, big_endian: bool = False):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, generate_uid
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRBigEndian if big_endian else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = modality, "P1"
    return ds


def write_palette(path: Path, index: np.ndarray, luts: list[np.ndarray], big_endian: bool) -> Path:
    """A PALETTE COLOR ultrasound object with 16-bit LUTs, written as a big- or little-endian scanner would: the
    OW table words in the transfer syntax's byte order."""
    from pydicom.uid import UltrasoundImageStorage
    ds = _dataset(UltrasoundImageStorage, "US", big_endian)
    ds.Rows, ds.Columns = index.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "PALETTE COLOR"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = index.astype(np.uint8).tobytes()
    order = ">u2" if big_endian else "<u2"
    for colour, lut in zip(("Red", "Green", "Blue"), luts):
        ds[f"{colour}PaletteColorLookupTableDescriptor"] = pydicom.DataElement(
            f"{colour}PaletteColorLookupTableDescriptor", "US", [len(lut), 0, 16])
        ds[f"{colour}PaletteColorLookupTableData"] = pydicom.DataElement(
            f"{colour}PaletteColorLookupTableData", "OW", lut.astype(order).tobytes())
    ds.save_as(path, enforce_file_format=True)
    return path


def write_us(path: Path, grey: np.ndarray, region: tuple[int, int, int, int] | None = None,
             burned_in: str | None = None) -> Path:
    """An 8-bit MONOCHROME2 ultrasound object, optionally declaring one image region (x0, y0, x1, y1)."""
    from pydicom.dataset import Dataset
    from pydicom.uid import UltrasoundImageStorage
    ds = _dataset(UltrasoundImageStorage, "US")
    ds.set_pixel_data(grey.astype(np.uint8), "MONOCHROME2", 8)
    if region is not None:
        r = Dataset()
        r.RegionLocationMinX0, r.RegionLocationMinY0, r.RegionLocationMaxX1, r.RegionLocationMaxY1 = region
        r.RegionSpatialFormat, r.RegionDataType = 1, 1
        ds.SequenceOfUltrasoundRegions = [r]
    if burned_in:
        ds.BurnedInAnnotation = burned_in
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def bannered(seed: int = 0, h: int = 120, w: int = 160, text: str = "ACME US  L12-5  MI 0.9") -> np.ndarray:
    """Speckle (1..190) in the image area (rows 30..109, columns 20..139) under a black banner of white text
    (antialiased: its strokes reach 254)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(100, 20, (h, w)).clip(1, 190).astype(np.uint8)
    img = Image.fromarray(a)
    draw = ImageDraw.Draw(img)
    draw.rectangle((0, 0, w - 1, 24), fill=0)
    draw.text((4, 6), text, fill=255)
    return np.array(img)


REGION = (20, 30, 139, 109)


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``oncotransfer ARGS`` in-process (as tests/test_cli.py does): (exit code, stdout, stderr)."""
    import sys
    from oncotransfer import cli
    monkeypatch.setattr(sys, "argv", ["oncotransfer", *args])
    monkeypatch.setattr(cli.console, "width", 250)
    with pytest.raises(SystemExit) as e:
        cli.main()
    out = capsys.readouterr()
    return (e.value.code or 0), out.out, out.err


# ---------------------------------------------------------------- PALETTE COLOR
@needs_real
def test_palette_object_in_three_encodings_gives_the_same_pixels():
    ref = pixels(REAL_DICOM / "OBXXXX1A.dcm", us_region=False)
    assert ref.std() > 30 and (ref[..., 0] != ref[..., 2]).any()  # a colour image, not black
    for twin in ("OBXXXX1A_expb.dcm", "OBXXXX1A_rle.dcm"):  # explicit big endian, RLE
        assert np.array_equal(pixels(REAL_DICOM / twin, us_region=False), ref), twin


def test_big_endian_palette_is_read_in_its_own_byte_order(tmp_path):
    from pydicom.pixels import apply_color_lut
    v = np.arange(256)
    luts = [v * 257, 65535 - v * 257, v << 8]  # full-scale ramps, and 8-bit values stored in the high byte
    index = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    le = write_palette(tmp_path / "le.dcm", index, luts, big_endian=False)
    be = write_palette(tmp_path / "be.dcm", index, luts, big_endian=True)
    a, b = pixels(le), pixels(be)
    assert np.array_equal(a, b)
    assert a[0, :, 0].tolist() == v.tolist() and a[0, :, 1].tolist() == (255 - v).tolist()
    assert a[0, 255, 2] == 254 and a[0, 128, 2] == 128  # (v << 8) / 257, rounded, as 16-bit RGB samples
    # the reproduction is faithful: pydicom's own LUT step reads the big-endian words 0xFF00 as 0x00FF (a ramp
    # of 0xABAB words reads the same either way, so only the blue table shows it)
    ds = pydicom.dcmread(be)
    assert apply_color_lut(ds.pixel_array, ds)[0, 255, 2] == 255 and a[0, 255, 2] == 254


def test_palette_descriptor_first_value_and_8_bit_entries():
    from pydicom.dataset import Dataset
    from oncotransfer.data.readers.dicom_pixels import palette_to_rgb8
    ds = Dataset()
    ds.PixelRepresentation = 0
    for colour in ("Red", "Green", "Blue"):  # 4 entries from value 10 on, 8-bit values in 16-bit words
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [4, 10, 8])
        setattr(ds, f"{colour}PaletteColorLookupTableData", np.array([5, 50, 100, 200], "<u2").tobytes())
    out = palette_to_rgb8(np.array([[0, 10, 11, 12, 13, 99]]), ds)
    assert out[0, :, 0].tolist() == [5, 5, 50, 100, 200, 200]  # below the first value: first entry; above: last


# ---------------------------------------------------------------- not images to classify
def test_segmentation_and_dose_objects_are_refused_with_one_line():
    for name, what in (("liver_1frame.dcm", "a segmentation object (SEG), not an image to classify"),
                       ("liver_expb_1frame.dcm", "segmentation object (SEG)"),
                       ("rtdose.dcm", "a radiotherapy dose grid (RTDOSE), not an image to classify")):
        with pytest.raises(ImageReadError) as e:
            open_rgb(get_testdata_file(name))
        assert what in str(e.value) and "\n" not in str(e.value)
        with pytest.raises(ImageReadError):
            D.read_info(get_testdata_file(name))  # the manifest and inspect refuse it from the header


@needs_real
def test_real_segmentation_is_refused():
    with pytest.raises(ImageReadError, match=r"liver.dcm: a segmentation object \(SEG\), not an image to classify"):
        open_rgb(REAL_DICOM / "liver.dcm")


# ---------------------------------------------------------------- blank images
def test_blank_reason():
    assert blank_reason(np.zeros((8, 8, 3), np.uint8)) == "constant image (every pixel = 0)"
    assert blank_reason(Image.new("RGB", (9, 9), (7, 7, 7))) == "constant image (every pixel = 7)"
    near = np.zeros((32, 32), np.uint8)
    near[0, :10] = 3
    assert blank_reason(near).startswith("near-blank image (pixel std 0.")
    assert blank_reason(open_rgb(get_testdata_file("CT_small.dcm"))) is None


def test_blank_images_named_by_inspect_and_training_but_kept(tmp_path, monkeypatch, capsys):
    from oncotransfer.config import DataConfig
    from oncotransfer.train.data import load_data
    rng = np.random.default_rng(1)
    for c in ("benign", "malignant"):
        for k in range(3):
            write_us(tmp_path / c / f"{c}{k}.dcm", rng.integers(0, 255, (40, 48)), burned_in="YES")
    write_us(tmp_path / "benign" / "black.dcm", np.zeros((40, 48)), region=(0, 0, 20, 20))
    data = load_data(DataConfig(path=str(tmp_path)), 32, workers=1, phash=False)
    assert len(data.manifest) == 7
    lines = [w for w in data.warnings if "blank" in w]
    assert len(lines) == 1 and "black.dcm" in lines[0] and "constant image (every pixel = 0)" in lines[0]
    code, out, err = run_main(monkeypatch, capsys, "data", "inspect", str(tmp_path))
    assert code == 0, err
    assert "warning: blank image: benign/black.dcm: constant image (every pixel = 0)" in err
    assert "declare burned-in annotation: 6; ultrasound image region usable: 1" in out
    code, out, _ = run_main(monkeypatch, capsys, "data", "inspect", str(tmp_path), "--json")
    doc = json.loads(out)
    assert doc["blank"] == {"benign/black.dcm": "constant image (every pixel = 0)"}
    assert doc["dicom"]["burned_in_annotation"] == 6 and doc["dicom"]["us_region"] == 1


# ---------------------------------------------------------------- ultrasound regions
@needs_real
def test_real_ultrasound_regions():
    ob = D.read_info(REAL_DICOM / "OBXXXX1A.dcm")
    assert ob.us_region and ob.size == (800, 600)
    ds = pydicom.dcmread(REAL_DICOM / "OBXXXX1A.dcm", stop_before_pixels=True)
    assert region_box(ds) == (120, 60, 799, 518)  # the larger of two regions; MaxX1 = 800 clamped to the frame
    whole = pixels(REAL_DICOM / "OBXXXX1A.dcm", us_region=False)
    crop = pixels(REAL_DICOM / "OBXXXX1A.dcm")
    assert crop.shape == (459, 680, 3) and np.array_equal(crop, whole[60:519, 120:800])
    assert np.array_equal(pixels(REAL_DICOM / "OBXXXX1A_expb.dcm"), crop)
    us1 = REAL_DICOM / "US1_UNCR.dcm"  # colour Doppler without a region sequence: the whole frame
    assert not D.read_info(us1).us_region and pixels(us1).shape == (480, 640, 3)


def test_regions_reaching_past_the_frame_are_not_trusted():
    for name, size in (("examples_palette.dcm", (350, 800)), ("examples_ybr_color.dcm", (240, 320))):
        ds = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)  # frames cut / downscaled after
        assert (ds.Rows, ds.Columns) == size and ds.SequenceOfUltrasoundRegions and region_box(ds) is None
        assert pixels(get_testdata_file(name)).shape[:2] == size


def test_region_crop_removes_the_banner_and_off_keeps_it(tmp_path):
    grey = bannered()
    f = write_us(tmp_path / "a.dcm", grey, REGION, burned_in="YES")
    crop, whole = pixels(f), pixels(f, us_region=False)
    assert whole.shape == (120, 160, 3) and (whole[:25] > 200).sum() > 50  # the banner's text
    assert crop.shape == (80, 120, 3) and np.array_equal(crop[..., 0], grey[30:110, 20:140])
    assert not (crop > 200).any() and not (crop == 0).any()  # neither its text nor its black band
    ds = pydicom.dcmread(f)
    for bad in ((200, 0, 300, 50), (10, 10, 10, 60)):  # outside the frame; a degenerate line
        r = ds.SequenceOfUltrasoundRegions[0]
        r.RegionLocationMinX0, r.RegionLocationMinY0, r.RegionLocationMaxX1, r.RegionLocationMaxY1 = bad
        assert region_box(ds) is None


def test_us_region_config_reaches_training_predict_and_serve(tmp_path, one_thread):
    from oncotransfer.config import DataConfig, validate
    from oncotransfer.errors import ConfigError
    from oncotransfer.experiments.run import run_experiment
    from oncotransfer.infer.predict import Predictor, run_predict
    from oncotransfer.train.data import load_data
    with pytest.raises(ConfigError, match=r"'data.us_region' \(got 'crop'\)"):
        validate({"data": {"us_region": "crop"}}, "--set")
    assert validate({"data": {"us_region": False}}, "yaml").data.us_region == "off"  # YAML's bare off
    rng = np.random.default_rng(0)
    for c, level in (("benign", 70), ("malignant", 170)):
        for k in range(6):
            g = bannered(k + (0 if c == "benign" else 100))
            g[40:100, 40:120] = rng.normal(level, 10, (60, 80)).clip(1, 190)
            write_us(tmp_path / "ds" / c / f"{c}{k}.dcm", g, REGION, burned_in="YES")
    auto = load_data(DataConfig(path=str(tmp_path / "ds")), 32, workers=1, phash=False).images
    off = load_data(DataConfig(path=str(tmp_path / "ds"), us_region="off"), 32, workers=1, phash=False).images
    assert auto[..., :6, :].float().mean() > 70 > 30 > off[..., :6, :].float().mean()  # the black banner: off only
    cfg = validate({"name": "us", "output_dir": str(tmp_path / "runs"),
                    "data": {"path": str(tmp_path / "ds"), "image_size": 32},
                    "split": {"kind": "holdout", "test_size": 0.34, "val_size": 0.0, "group_by_patient": False,
                              "allow_image_level_split": True},
                    "model": {"backbone": "efficientnet_lite0", "weights": "efficientnet_lite0_packaged",
                              "freeze": "frozen"},
                    "train": {"epochs": 2, "cache_dir": str(tmp_path / "cache"), "num_workers": 1,
                              "feature_engine": "torch"}, "evaluate": {"bootstrap": 0}}, "test")
    run_dir = run_experiment(cfg).run_dir
    keys = {d.name for d in (tmp_path / "cache").iterdir() if d.is_dir()}
    # (whole frames share their banner, so pHash would merge them into one group: split by image here)
    run_experiment(cfg.model_copy(update={"data": cfg.data.model_copy(update={"us_region": "off"}),
                                          "split": cfg.split.model_copy(update={"group_duplicates": False})}))
    # one file, two images (cropped, whole): `off` must not read the features cached for `auto`'s crops
    assert len({d.name for d in (tmp_path / "cache").iterdir() if d.is_dir()} - keys) == 1
    pred = Predictor.from_run(run_dir, "torch")
    assert pred.us_region
    write_us(tmp_path / "new" / "black.dcm", np.zeros((120, 160)), REGION)
    f = tmp_path / "ds" / "malignant" / "malignant0.dcm"
    df, errors = run_predict(run_dir, [str(f), str(tmp_path / "new")], tmp_path / "p.csv", engine="torch",
                             explain=True)
    assert not errors and df.attrs["blank"] == {str(tmp_path / "new" / "black.dcm"): "constant image (every pixel = 0)"}
    assert list(df.columns)[:2] == ["path", "pred"] and "blank" not in df.columns
    overlay = Image.open(tmp_path / "p_explain" / "malignant0.png")
    assert overlay.size[0] / overlay.size[1] == pytest.approx(120 / 80, rel=0.02)  # the crop, not the frame
    from oncotransfer.cli_output import trust_lines
    assert any("blank input" in line and "black.dcm" in line for line in trust_lines(df))
    from fastapi.testclient import TestClient
    from oncotransfer.serve.app import create_app
    r = TestClient(create_app(run_dir, engine="torch")).post("/predict", files={"file": ("u", f.read_bytes())})
    assert r.status_code == 200, r.text
    assert abs(r.json()["probabilities"]["malignant"] - df.set_index("path").loc[str(f), "prob_malignant"]) < 1e-5
    assert pred.meta["config"]["data"]["us_region"] == "auto"
    del pred.meta["config"]["data"]["us_region"]  # a run saved before the setting trained on whole frames
    assert not pred.us_region
