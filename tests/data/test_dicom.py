"""DICOM input: pydicom's own test objects decode or give one line; ultrasound objects built from real BUSI images
(and from synthetic ones) train end to end with patient-grouped splits and no raw identifiers in the run."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
from pydicom.data import get_testdata_file, get_testdata_files  # noqa: E402

from oncotransfer.data.readers import dicom as D  # noqa: E402
from oncotransfer.data.readers import ImageReadError, open_rgb  # noqa: E402
from oncotransfer.data.manifest import load_manifest  # noqa: E402
from oncotransfer.errors import ConfigError, MissingExtraError  # noqa: E402

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="module", autouse=True)
def salt():
    with pytest.MonkeyPatch.context() as mp:  # no key file written in the tester's home
        mp.setenv("ONCOTRANSFER_ID_SALT", "tests-salt-of-16+bytes")
        yield


def write_us(path: Path, pixels: np.ndarray, patient: str, name: str, study: str = "1.2.3.4",
             series: str = "1.2.3.4.5", **extra) -> Path:
    """An ultrasound object (US or US multi-frame storage), 8-bit MONOCHROME2, explicit VR little endian."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (ExplicitVRLittleEndian, UltrasoundImageStorage, UltrasoundMultiFrameImageStorage,
                             generate_uid)
    multi = pixels.ndim == 3
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage if multi else UltrasoundImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName = patient, name
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.Modality, ds.Manufacturer = "US", "TestVendor"
    ds.set_pixel_data(pixels.astype(np.uint8), "MONOCHROME2", 8)
    for k, v in extra.items():
        setattr(ds, k, v)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def raw_ids(i: int) -> tuple[str, str]:
    """(PatientID, PatientName) of patient ``i``."""
    return f"MRN{4711000 + i}", f"DOE^JANE{i}"


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``oncotransfer ARGS`` in-process through ``main()`` (as tests/test_cli.py does)."""
    import sys
    from oncotransfer import cli
    monkeypatch.setattr(sys, "argv", ["oncotransfer", *args])
    monkeypatch.setattr(cli.console, "width", 250)
    with pytest.raises(SystemExit) as e:
        cli.main()
    out = capsys.readouterr()
    return (e.value.code or 0), out.out, out.err


def us_folder(root: Path, grey: dict[str, list[np.ndarray]], per_patient: int = 2,
              multiframe: int = 0) -> dict[str, str]:
    """Class folders of US objects, ``per_patient`` objects per (class-pure) patient; every third file has no
    suffix (recognised by its DICM magic); ``multiframe`` extra 3-frame objects per class. File names never
    hold the ids. Returns {file path: raw PatientID}."""
    out, pid = {}, 0
    for c, images in grey.items():
        for j, img in enumerate(images):
            if j % per_patient == 0:
                pid += 1
            patient, name = raw_ids(pid)
            f = root / c / (f"img{j:03d}.dcm" if j % 3 else f"img{j:03d}")
            out[str(write_us(f, img, patient, name, study=f"1.2.826.0.1.{pid}", series=f"1.2.826.0.1.{pid}.1"))] = patient
        for k in range(multiframe):
            pid += 1
            patient, name = raw_ids(pid)
            cine = np.stack([images[k]] * 3).astype(np.int16) + np.arange(3)[:, None, None] * 5
            f = write_us(root / c / f"cine{k}.dcm", cine.clip(0, 255), patient, name, study=f"1.2.826.0.2.{pid}")
            out[str(f)] = patient
    return out


def synthetic_grey(n: int, size: int = 64, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """'benign': a dark smooth disc; 'malignant': a bright speckled one; both on speckle noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = {}
    for c, (level, r) in {"benign": (60, 0.25), "malignant": (190, 0.35)}.items():
        imgs = []
        for _ in range(n):
            disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (r * size) ** 2
            a = rng.normal(110, 25, (size, size))
            a[disc] = rng.normal(level, 15, disc.sum())
            imgs.append(a.clip(0, 255).astype(np.uint8))
        out[c] = imgs
    return out


# ---------------------------------------------------------------- pydicom's own test objects
def test_every_pydicom_test_file_loads_or_gives_one_line():
    files = [Path(f) for f in get_testdata_files() if Path(f).is_file()]
    loaded, reasons = [], {}
    for f in files:
        try:
            img = open_rgb(f)
        except ImageReadError as e:
            assert "\n" not in str(e) and str(f) in str(e), str(e)
            reasons[f.name] = str(e)
        else:
            assert img.mode == "RGB" and img.size[0] > 0
            loaded.append(f.name)
    for name in ("CT_small.dcm", "MR_small.dcm", "SC_rgb_rle.dcm", "SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm",
                 "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm", "JPGExtended.dcm", "examples_palette.dcm",
                 "examples_ybr_color.dcm", "SC_rgb_rle_2frame.dcm", "image_dfl.dcm", "MR_small_bigendian.dcm"):
        assert name in loaded, reasons.get(name)
    assert "less than expected" in reasons["MR_truncated.dcm"]
    assert "without pixel data" in reasons["rtplan.dcm"]
    assert "not an image to classify" in reasons["rtdose.dcm"] and "(SEG)" in reasons["liver_1frame.dcm"]
    assert len(loaded) >= 80, len(loaded)  # 85 before segmentations and dose grids were refused


def arr(name_or_path, us_region: bool = True) -> np.ndarray:
    p = name_or_path if isinstance(name_or_path, Path) else get_testdata_file(name_or_path)
    return np.asarray(open_rgb(p, us_region=us_region)).astype(int)


def test_lossless_syntaxes_decode_to_the_same_pixels():
    ref = arr("MR_small.dcm")
    for variant in ("MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm",
                    "MR_small_bigendian.dcm", "MR_small_implicit.dcm"):
        assert np.array_equal(arr(variant), ref), variant
    assert ref.max() - ref.min() > 150 and np.all(ref[..., 0] == ref[..., 1])  # grey, its stated window


def test_colour_photometric_interpretations():
    rgb = arr("SC_rgb_rle.dcm")  # pydicom's reference stripes: red, light red, green, ..., light blue
    assert rgb[5, 50].tolist() == [255, 0, 0] and rgb[25, 50].tolist() == [0, 255, 0]
    assert rgb[55, 50].tolist() == [128, 128, 255]
    ybr = arr("SC_ybr_full_422_uncompressed.dcm")  # YBR_FULL_422 -> RGB
    assert np.abs(ybr - rgb).mean() < 2
    assert np.array_equal(arr("SC_rgb_rle_16bit.dcm"), rgb)  # 16 bits per sample -> the same 8-bit image
    pal = arr("examples_palette.dcm", us_region=False)  # PALETTE COLOR through its lookup table (whole frame)
    assert (pal[..., 0] != pal[..., 1]).mean() > 0.1


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    assert np.array_equal(arr(tmp_path / "m1.dcm"), 255 - arr("MR_small.dcm"))
    # pydicom's real MONOCHROME1 radiographs (CR, 12 bits, rescale slope 0.684, a window): high values are dark
    crs = [Path(f) for f in get_testdata_files() if "/CR" in f and Path(f).is_file()]
    assert len(crs) == 3
    for f in crs:
        raw = pydicom.dcmread(f).pixel_array.astype(float).ravel()
        out = arr(f)[..., 0].ravel()
        assert pydicom.dcmread(f).PhotometricInterpretation == "MONOCHROME1"
        assert np.corrcoef(raw, out)[0, 1] < -0.99


def _ct(tmp_path: Path, **window) -> Path:
    from pydicom.uid import CTImageStorage
    ramp = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (8, 1))  # 0..4080 stored, 12 bits
    f = write_us(tmp_path / "ct.dcm", np.zeros((2, 2)), "x", "y")
    ds = pydicom.dcmread(f)
    ds.SOPClassUID = CTImageStorage
    ds.set_pixel_data(ramp, "MONOCHROME2", 12)
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    for k, v in window.items():
        setattr(ds, k, v)
    ds.save_as(f, enforce_file_format=True)
    return f


def test_rescale_and_window(tmp_path):
    hu = np.arange(0, 4096, 16) - 1024
    windowed = arr(_ct(tmp_path, WindowCenter=40, WindowWidth=400))[0, :, 0]
    assert (windowed[hu <= -160] == 0).all() and (windowed[hu >= 240] == 255).all()
    inside = (hu > -150) & (hu < 230)
    assert np.abs(windowed[inside] - (hu[inside] + 160) / 400 * 255).max() <= 2  # linear across the window
    plain = arr(_ct(tmp_path))[0, :, 0]  # no window: the used range stretched to 8 bits
    assert plain[0] == 0 and plain[-1] == 255 and np.all(np.diff(plain) >= 0)


def test_missing_plugin_and_missing_pydicom_are_one_line(monkeypatch):
    class Unavailable:
        is_available = False
    monkeypatch.setattr(D, "_decoder", lambda uid: Unavailable())
    with pytest.raises(ImageReadError, match=r"JPEG 2000.*pip install 'oncotransfer\[dicom\]'"):
        open_rgb(get_testdata_file("JPEG2000.dcm"))
    assert np.asarray(open_rgb(get_testdata_file("MR_small.dcm"))).any()  # uncompressed needs no plugin
    monkeypatch.setitem(__import__("sys").modules, "pydicom", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'oncotransfer\[dicom\]'"):
        D.read_info(get_testdata_file("CT_small.dcm"))


# ---------------------------------------------------------------- recognition, frames, manifest rows
def test_recognised_with_or_without_suffix_and_frames_policy(tmp_path):
    cine = np.stack([np.full((8, 8), 40 * k, np.uint8) for k in range(5)])
    f = write_us(tmp_path / "noext" / "object", cine, "P1", "A^B")
    assert D.has_preamble(f) and D.is_dicom_path(f) and not D.is_dicom_path(tmp_path / "x.png")
    assert np.asarray(open_rgb(f))[0, 0, 0] == 80  # middle of 5 frames: frame 2
    assert np.asarray(open_rgb(f"{f}#frame=4"))[0, 0, 0] == 160
    with pytest.raises(ImageReadError, match="frame 9 does not exist"):
        open_rgb(f"{f}#frame=9")
    assert D.is_dicom_bytes(f.read_bytes()) and np.asarray(open_rgb(f.read_bytes()))[0, 0, 0] == 80
    assert np.asarray(open_rgb(f.read_bytes(), frame=1))[0, 0, 0] == 40  # serve under index:1
    assert D.frames_for(5, "middle") == [2] and D.frames_for(5, "all") == [0, 1, 2, 3, 4]
    assert D.frames_for(5, "index:3") == [3] and "has 5 frames" in D.frames_for(5, "index:7")
    assert D.frames_for(1, "index:7") == [0]


def test_config_rejects_a_bad_frame_policy():
    from oncotransfer.config import validate
    assert validate({"data": {"dicom_frames": "index:2"}}).data.dicom_frames == "index:2"
    with pytest.raises(ConfigError, match=r"data.dicom_frames.*'middle', 'all' or 'index:N'"):
        validate({"data": {"dicom_frames": "last"}})


def test_manifest_patients_hashed_frames_expanded_and_bad_objects_named(tmp_path):
    ids = us_folder(tmp_path / "ds", synthetic_grey(4, size=16), multiframe=1)
    bad = tmp_path / "ds" / "benign"
    shutil.copy(get_testdata_file("rtplan.dcm"), bad / "plan.dcm")
    (bad / "garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)
    (bad / "notes.txt").write_text("not an image")  # neither an image suffix nor DICM: not a row
    m = load_manifest(tmp_path / "ds", dicom_frames="all")
    objects = {D.split_frame(p)[0] for p in m.paths}
    assert objects == set(ids) and len(m) == 8 + 2 * 3  # 4 objects per class + one 3-frame cine each
    assert sorted(Path(p).name for p in m.skipped) == ["garbage.dcm", "plan.dcm"]
    assert "no DICOM data elements" in m.skipped[str(bad / "garbage.dcm")]
    assert all("\n" not in why for why in m.skipped.values())
    assert "without pixel data" in m.skipped[str(bad / "plan.dcm")]
    # patients: one salted hash per PatientID, the same for every frame, never the raw id
    for p, pat in zip(m.paths, m.patients):
        assert pat == D.hash_id(ids[D.split_frame(p)[0]]) and pat.startswith("p-") and "MRN" not in pat
    assert len(set(m.patients)) == 6 and len(set(m.sha256)) == len(m)  # frames are distinct images
    mid = load_manifest(tmp_path / "ds")  # middle: one row per object
    assert len(mid) == 10 and sum("#frame=1" in p for p in mid.paths) == 2
    # a CSV manifest of DICOM paths takes the patients from PatientID as well
    (tmp_path / "ds" / "list.csv").write_text("path,label\n" + "".join(
        f"{Path(p).relative_to(tmp_path / 'ds')},{Path(p).parent.name}\n" for p in ids))
    csv = load_manifest(tmp_path / "ds" / "list.csv")
    assert len(csv) == 10 and set(csv.patients) == set(mid.patients)


def test_same_patient_same_hash_and_key_kept_private(tmp_path, monkeypatch):
    a = D.hash_id("MRN1")
    assert a == D.hash_id("MRN1") != D.hash_id("MRN2")
    monkeypatch.setenv("ONCOTRANSFER_ID_SALT", "another-key-of-16+bytes")
    assert D.hash_id("MRN1") != a  # keyed: without the key a short id cannot be brute-forced from the hash
    monkeypatch.delenv("ONCOTRANSFER_ID_SALT")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    b = D.hash_id("MRN1")
    key = tmp_path / "oncotransfer" / "id_salt"
    assert key.is_file() and (key.stat().st_mode & 0o777) == 0o600 and D.hash_id("MRN1") == b


def test_inspect_summarises_dicom_without_raw_ids(tmp_path, monkeypatch, capsys):
    ids = us_folder(tmp_path / "ds", synthetic_grey(4, size=16), multiframe=1)
    shutil.copy(get_testdata_file("MR_truncated.dcm"), tmp_path / "ds" / "benign" / "truncated.dcm")
    code, out, err = run_main(monkeypatch, capsys, "data", "inspect", str(tmp_path / "ds"))
    assert code == 0, err
    assert "DICOM: 10 object(s), 6 patient(s), 6 study(ies)" in out
    for needle in ("modality: US (10)", "manufacturer: TestVendor (10)", "frames per object: 1 (8), 3 (2)",
                   "bits stored: 8 (10)", "MONOCHROME2 (10)", D.hash_id(next(iter(ids.values()))),
                   D.hash_id("1.2.826.0.1.1", "st")):
        assert needle in out, needle
    assert "truncated.dcm" in err and "truncated.dcm" not in out  # warnings go to stderr
    assert "MRN" not in out and "DOE" not in out and "1.2.826" not in out
    code, _, err = run_main(monkeypatch, capsys, "data", "inspect", str(tmp_path / "ds"), "--dicom-frames", "every")
    assert code == 2 and "dicom_frames" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- end to end
def _train(data: Path, tmp: Path, frames: str = "middle", report: bool = False, size: int = 64):
    from oncotransfer.config import validate
    from oncotransfer.experiments.run import run_experiment
    cfg = validate({
        "name": "us", "output_dir": str(tmp / "runs"),
        "data": {"path": str(data), "image_size": size, "dicom_frames": frames},
        "split": {"kind": "holdout", "test_size": 0.3, "val_size": 0.0, "group_by_patient": True},
        "model": {"backbone": "efficientnet_lite0", "weights": "efficientnet_lite0_packaged", "freeze": "frozen"},
        "train": {"epochs": 3, "cache_dir": str(tmp / "cache"), "num_workers": 1, "feature_engine": "torch"},
        "evaluate": {"bootstrap": 0},
    }, "test_dicom")
    return run_experiment(cfg, report=report)


def _check_run(run_dir: Path, ids: dict[str, str]) -> None:
    import pandas as pd
    split = pd.read_csv(run_dir / "split.csv")
    assert json.loads((run_dir / "run.json").read_text())["protocol"]["grouped_by"] == "patient"
    train_p = set(split[split.subset == "train"].patient)
    test_p = set(split[split.subset == "test"].patient)
    assert train_p and test_p and not train_p & test_p
    by_object = split.assign(obj=split.path.str.replace(r"#frame=\d+$", "", regex=True))
    assert (by_object.groupby("obj").patient.nunique() == 1).all()  # frames of an object share its patient
    assert set(split.patient) == {D.hash_id(p) for p in ids.values()}
    raw = {s for i in range(1, 100) for s in raw_ids(i) if raw_ids(i)[0] in ids.values()}
    assert len(raw) == 2 * len(set(ids.values()))
    leaked = []
    for f in run_dir.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            leaked += [(f.name, r) for r in raw if r.encode() in data or r.replace("^", " ").encode() in data]
    assert not leaked, leaked[:5]


def test_synthetic_us_dicoms_train_grouped_by_patient(tmp_path, one_thread):
    ids = us_folder(tmp_path / "ds", synthetic_grey(8), multiframe=2)
    shutil.copy(get_testdata_file("MR_truncated.dcm"), tmp_path / "ds" / "benign" / "truncated.dcm")  # decode fails
    (tmp_path / "ds" / "malignant" / "garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 40)  # header fails
    result = _train(tmp_path / "ds", tmp_path, frames="all", report=True)
    _check_run(result.run_dir, ids)
    assert (result.run_dir / "report.html").is_file()
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["n_images"] == 16 + 2 * 2 * 3 and result.metrics["pooled"]["accuracy"] >= 0.8
    skipped = {Path(p).name: why for p, why in run["skipped"].items()}
    assert sorted(skipped) == ["garbage.dcm", "truncated.dcm"] and "less than expected" in skipped["truncated.dcm"]
    assert sum("truncated.dcm" in w or "garbage.dcm" in w for w in run["warnings"]) == 2
    # predict reads the same objects: one row per frame under the run's `all` policy
    from oncotransfer.infer.predict import run_predict
    df, errors = run_predict(result.run_dir, [str(tmp_path / "ds" / "malignant")], tmp_path / "p.csv",
                             engine="torch")
    assert len(df) == 8 + 2 * 3 and (df["pred"] == "malignant").mean() >= 0.8
    assert [Path(p).name for p in errors] == ["garbage.dcm"] and "no DICOM data elements" in next(iter(errors.values()))
    # serve: an uploaded DICOM (no suffix needed: the DICM magic) is decoded like the file (its middle frame)
    from fastapi.testclient import TestClient
    from oncotransfer.serve.app import create_app
    client = TestClient(create_app(result.run_dir, engine="torch"))
    cine = tmp_path / "ds" / "malignant" / "cine0.dcm"
    r = client.post("/predict", files={"file": ("upload", cine.read_bytes(), "application/dicom")})
    assert r.status_code == 200, r.text
    assert abs(r.json()["probabilities"]["malignant"] - df.set_index("path").loc[f"{cine}#frame=1", "prob_malignant"]) < 1e-5
    r = client.post("/predict", files={"file": ("x.dcm", (tmp_path / "ds" / "malignant" / "garbage.dcm").read_bytes())})
    assert r.status_code == 400 and "no DICOM data elements" in r.json()["error"]


@pytest.mark.skipif(not (SHARED / "busi-dev" / "manifest.csv").is_file() and
                    not (SHARED / "bus250" / "manifest.csv").is_file(), reason="../shared/data is absent")
def test_busi_images_as_ultrasound_dicoms_train_grouped_by_patient(tmp_path, one_thread):
    import pandas as pd
    src = SHARED / "busi-dev" if (SHARED / "busi-dev" / "manifest.csv").is_file() else SHARED / "bus250"
    rows = pd.read_csv(src / "manifest.csv")
    grey = {c: [np.asarray(Image.open(src / p).convert("L").resize((96, 96)))
                for p in rows[rows.label == c].path.iloc[:12]] for c in ("benign", "malignant")}
    ids = us_folder(tmp_path / "ds", grey, per_patient=2)
    result = _train(tmp_path / "ds", tmp_path)
    _check_run(result.run_dir, ids)
    assert json.loads((result.run_dir / "run.json").read_text())["n_images"] == 24


def test_frames_of_one_object_stay_together_without_patient_ids(tmp_path):
    from oncotransfer.config import DataConfig, SplitConfig
    from oncotransfer.data.splits import make_split
    from oncotransfer.train.data import load_data
    grey = synthetic_grey(6, size=16, seed=3)
    for c, images in grey.items():
        for k, img in enumerate(images):  # 3-frame cines with PatientID left empty
            cine = np.stack([np.roll(img, 4 * j, axis=1) for j in range(3)])
            write_us(tmp_path / c / f"c{k}.dcm", cine, "", "")
    data = load_data(DataConfig(path=str(tmp_path), dicom_frames="all"), 32, workers=1)
    m = data.manifest
    assert m.patients is None and len(m) == 36
    split = make_split(m, SplitConfig(kind="kfold", folds=3, val_size=0, group_by_patient=False,
                                      allow_image_level_split=True), data.dup_groups)
    objects = np.array([D.split_frame(p)[0] for p in m.paths])
    for f in split.folds:
        assert not set(objects[f.train]) & set(objects[f.test])
    assert split.grouped_by == "duplicates" and split.image_level


def test_a_split_by_patient_names_the_objects_without_patient_id(tmp_path):
    """The error says which objects lack a PatientID and offers what `train` takes (no --patient-regex)."""
    from oncotransfer.config import SplitConfig
    from oncotransfer.data.manifest import load_manifest
    from oncotransfer.data.splits import make_split
    from oncotransfer.errors import LeakageError
    grey = synthetic_grey(4, size=16, seed=5)
    for c, images in grey.items():
        for k, img in enumerate(images):
            pid = ("", "") if k % 2 else raw_ids(k)  # every second object without a PatientID
            write_us(tmp_path / c / f"o{k}.dcm", img, *pid)
    m = load_manifest(tmp_path)
    assert m.patients is None and sorted(map(lambda p: Path(p).name, m.ungrouped)) == ["o1.dcm", "o1.dcm", "o3.dcm",
                                                                                      "o3.dcm"]
    with pytest.raises(LeakageError) as e:
        make_split(m, SplitConfig(kind="kfold", folds=2, group_by_patient=True))
    msg = str(e.value)
    assert "4 object(s) have no PatientID" in msg and "o1.dcm" in msg and "data.patient_regex" in msg
    assert "--patient-regex" not in msg
