"""NIfTI volumes end to end through one reader module (data/readers/nifti.py): folder -> one manifest row per
slice grouped by volume -> grouped folds -> decoded slices as a radiologist sees them -> data inspect."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

nib = pytest.importorskip("nibabel")

from oncotransfer.config import SplitConfig  # noqa: E402
from oncotransfer.data.frames import frame_paths  # noqa: E402
from oncotransfer.data.images import decode_many, resize_uint8  # noqa: E402
from oncotransfer.data.inspect import inspect_dataset  # noqa: E402
from oncotransfer.data.manifest import load_manifest  # noqa: E402
from oncotransfer.data.readers import READERS, ImageReadError, open_rgb, probe, reader_for, split_frame  # noqa: E402
from oncotransfer.data.readers import nifti as N  # noqa: E402
from oncotransfer.data.splits import make_split  # noqa: E402
from oncotransfer.errors import MissingExtraError  # noqa: E402

SHAPE = (32, 24, 8)  # x, y, slices: not square, so a missed transpose changes the decoded size


def volume(cls: int, seed: int) -> np.ndarray:
    """int16 voxels: class 0 a smooth gradient, class 1 the same with a bright block; noise differs per volume."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    v = 10 * x + 3 * y + 20 * z + rng.normal(0, 15, SHAPE)
    if cls:
        v[8:20, 4:12, 2:6] += 600
    return np.rint(v).astype(np.int16)


def save(path: Path, data: np.ndarray, affine=None, slope_inter=None, cal=None) -> Path:
    img = nib.Nifti1Image(data, np.diag([0.8, 0.8, 3.0, 1.0]) if affine is None else affine)
    img.header.set_xyzt_units("mm")
    if slope_inter:
        img.header.set_slope_inter(*slope_inter)
    if cal:
        img.header["cal_min"], img.header["cal_max"] = cal
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)
    return path


def expected(vol: np.ndarray, k: int, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Slice k as the test derives it: whole-volume 0.5/99.5 percentiles (or the given window), radiological view
    of a RAS slice (anterior = high y at the top, patient's right = high x on the viewer's left)."""
    vol = vol.astype(np.float64)
    if lo is None:
        lo, hi = np.percentile(vol, [0.5, 99.5])
    s = vol[:, :, k]
    shown = np.empty((s.shape[1], s.shape[0]))
    for r in range(shown.shape[0]):
        for c in range(shown.shape[1]):
            shown[r, c] = s[s.shape[0] - 1 - c, s.shape[1] - 1 - r]
    return np.clip(np.rint((shown - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)


def grey(img) -> np.ndarray:
    a = np.asarray(img)
    assert a.ndim == 3 and a.shape[2] == 3 and (a[..., 0] == a[..., 2]).all()  # grey shown as RGB
    return a[..., 0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """2 classes x 3 volumes, .nii and .nii.gz mixed; returns the root and each volume's voxels by name."""
    root = tmp_path_factory.mktemp("nifti") / "ds"
    vols = {}
    for cls, name in enumerate(("benign", "malignant")):
        for i in range(3):
            stem = f"{name[0]}{i}"
            vols[stem] = volume(cls, 10 * cls + i)
            save(root / name / f"{stem}{'.nii' if i == 0 else '.nii.gz'}", vols[stem])
    return root, vols


def test_registered_before_pillow_and_probed_from_the_header(dataset):
    root, _ = dataset
    assert list(READERS)[-2:] == ["nifti", "pillow"]
    f = str(root / "benign" / "b1.nii.gz")
    assert reader_for(f).name == "nifti" and reader_for(f"{f}#frame=3").name == "nifti"
    info = probe(f)
    assert open_rgb(f).size == (info.width, info.height)
    assert (info.reader, info.kind, info.frames, info.group) == ("nifti", "volume", 8, "benign/b1")
    assert (info.width, info.height, info.mode, info.mpp) == (32, 24, "int16", 800.0)  # 0.8 mm = 800 µm/px
    with pytest.raises(ImageReadError, match=r"b1\.nii\.gz: image too large.*per slice"):
        probe(f, max_pixels=24 * 32 - 1)


def test_one_row_per_slice_with_the_volume_as_patient(dataset):
    root, vols = dataset
    m = load_manifest(root, dicom_frames="all")
    assert len(m) == 6 * SHAPE[2] and not m.skipped
    names = [N.volume_name(split_frame(p)[0]) for p in m.paths]
    assert list(m.patients) == names and sorted(n.split("/")[1] for n in set(names)) == sorted(vols)
    assert [split_frame(p)[1] for p in m.paths[:8]] == list(range(8))
    assert len(set(m.sha256)) == len(m)  # each slice a distinct image for the caches
    middle = load_manifest(root, dicom_frames="middle")
    assert len(middle) == 6 and {split_frame(p)[1] for p in middle.paths} == {4}


def test_grouped_kfold_never_splits_a_volume(dataset):
    root, _ = dataset
    m = load_manifest(root, dicom_frames="all")
    split = make_split(m, SplitConfig(kind="kfold", folds=3, val_size=0.0))
    assert split.grouped_by == "patient" and not split.image_level
    tested = []
    for fold in split.folds:
        train = {m.patients[i] for i in fold.train}
        test = {m.patients[i] for i in fold.test}
        assert train and test and not train & test
        tested += sorted(test)
    assert sorted(tested) == sorted(set(m.patients))  # every volume tested once, all of its slices together


def test_decoded_slice_is_windowed_over_the_volume_and_shown_radiologically(dataset, tmp_path):
    root, vols = dataset
    for stem, f in (("b0", root / "benign" / "b0.nii"), ("m2", root / "malignant" / "m2.nii.gz")):
        for k in (0, 3, 7):
            assert np.array_equal(grey(open_rgb(f"{f}#frame={k}")), expected(vols[stem], k)), (stem, k)
    assert np.array_equal(grey(open_rgb(str(root / "benign" / "b0.nii"))), expected(vols["b0"], 4))  # middle
    # The same anatomy stored LAS (x runs right-to-left, FSL's layout) is shown the same way.
    las = save(tmp_path / "las.nii", vols["m2"][::-1].copy(), np.diag([-0.8, 0.8, 3.0, 1.0]))
    assert np.array_equal(grey(open_rgb(f"{las}#frame=3")), expected(vols["m2"], 3))
    # Stored integers are scaled by scl_slope/scl_inter before windowing; cal_min/cal_max, when set, is the window.
    raw = vols["m2"]
    scaled = save(tmp_path / "scaled.nii.gz", raw, slope_inter=(2.0, -100.0))
    assert np.array_equal(grey(open_rgb(f"{scaled}#frame=2")), expected(raw * 2.0 - 100, 2))
    cal = save(tmp_path / "cal.nii", raw, cal=(0.0, 300.0))
    assert np.array_equal(grey(open_rgb(f"{cal}#frame=5")), expected(raw, 5, 0.0, 300.0))
    with pytest.raises(ImageReadError, match=r"cal\.nii#frame=8: slice 8 does not exist \(the volume has 8"):
        open_rgb(f"{cal}#frame=8")


def test_unusable_files_are_one_line_naming_the_file(dataset, tmp_path):
    root, vols = dataset
    whole = (root / "malignant" / "m1.nii.gz").read_bytes()
    cases = {"truncated.nii.gz": whole[:len(whole) // 2], "header_cut.nii.gz": whole[:40],
             "text.nii": b"not a volume\n" * 40}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    save(tmp_path / "five_d.nii", np.zeros((4, 4, 2, 2, 2), np.int16))
    save(tmp_path / "one_d.nii", np.zeros(16, np.int16))
    for name in [*cases, "five_d.nii", "one_d.nii"]:
        with pytest.raises(ImageReadError) as e:
            open_rgb(f"{tmp_path / name}#frame=1")
        msg = str(e.value)
        assert msg.startswith(str(tmp_path / name)) and "\n" not in msg and len(msg) < 240, msg
    # A truncated .nii.gz passes the header-only probe, then each of its slices is refused at decode.
    assert probe(str(tmp_path / "truncated.nii.gz")).frames == 8
    with pytest.raises(ImageReadError, match="truncated.nii.gz: unreadable NIfTI voxel data"):
        open_rgb(str(tmp_path / "truncated.nii.gz"))
    with pytest.raises(ImageReadError, match="a 5-D NIfTI image"):
        probe(str(tmp_path / "five_d.nii"))


def test_data_inspect_and_decode_many_read_the_volumes(dataset, tmp_path):
    root, vols = dataset
    rep = inspect_dataset(root, dicom_frames="all")
    assert not rep.unreadable and rep.per_class == {"benign": 24, "malignant": 24}
    assert rep.sizes == {(32, 24): 48} and rep.modes == {"NIFTI": 48}
    assert sorted(p.split("/")[1] for p in rep.per_patient) == sorted(vols)
    assert rep.per_patient["malignant/m0"] == {"benign": 0, "malignant": 8}
    errors: dict[str, str] = {}
    paths = frame_paths([root / "malignant" / "m1.nii.gz", root / "benign" / "b0.nii"], "index:5", errors)
    images, ok, failed, _ = decode_many(paths, 16, workers=1)
    assert not errors and not failed and ok == [0, 1] and tuple(images.shape) == (2, 3, 16, 16)
    for got, stem in zip(images, ("m1", "b0")):  # the model's input is slice 5 as shown, resized
        want = resize_uint8(Image.fromarray(expected(vols[stem], 5)).convert("RGB"), 16)
        assert torch.equal(got, want), stem


def test_missing_nibabel_names_the_extra(dataset, monkeypatch):
    root, _ = dataset
    monkeypatch.setitem(__import__("sys").modules, "nibabel", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'oncotransfer\[nifti\]'"):
        N.NiftiReader().probe(str(root / "benign" / "b0.nii"))
