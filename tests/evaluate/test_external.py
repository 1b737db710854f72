"""``evaluate RUN --data OTHER`` says how much of OTHER the run trained or selected on, and scores the rest."""
from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from oncotransfer.data.manifest import resolve_data_path
from oncotransfer.data.overlap import hamming_min
from oncotransfer.infer.external import evaluate_on


def test_hamming_min():
    a = np.array([0, 0b1111, 2**63], dtype=np.uint64)
    b = np.array([0b1, 2**63 + 3], dtype=np.uint64)
    assert hamming_min(a, b).tolist() == [1, 3, 2]
    assert hamming_min(a, np.array([], dtype=np.uint64)).tolist() == [65, 65, 65]


def _other_set(run: Path, root: Path) -> dict:
    """10 byte copies of the run's training images, 1 resized and recompressed copy, 10 new images (breast
    ultrasound from demo:bus250 filed under the tiles' classes: the run never saw them)."""
    split = pd.read_csv(run / "split.csv")
    demo = resolve_data_path("demo:osteosarcoma")
    train = split[split["subset"] == "train"].drop_duplicates("index").sort_values("index")
    for _, r in train.head(10).iterrows():
        dst = root / r["label"] / ("copy_" + Path(r["path"]).name)
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(demo / r["path"], dst)
    r = train.iloc[11]
    img = Image.open(demo / r["path"]).convert("RGB")
    buf = io.BytesIO()
    img.resize((300, 300), Image.BICUBIC).save(buf, "JPEG", quality=80)
    (root / r["label"] / "near.jpg").write_bytes(buf.getvalue())
    other = sorted(resolve_data_path("demo:bus250").rglob("*.png"))[:10]
    for (_, r), src in zip(split.drop_duplicates("index").tail(10).iterrows(), other):
        (root / r["label"]).mkdir(parents=True, exist_ok=True)
        Image.open(src).convert("RGB").save(root / r["label"] / ("new_" + src.stem + ".png"))
    return {"n": 21, "identical": 10, "near": 1}


def test_overlap_with_training_images_is_counted_and_the_clean_rest_scored(tiny_run, tmp_path, monkeypatch,
                                                                           capsys):
    from oncotransfer import cli
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    _other_set(run, tmp_path / "other")
    assert {"sha256", "phash"} <= set(pd.read_csv(run / "split.csv").columns)   # saved for new runs
    monkeypatch.setattr(sys, "argv", ["oncotransfer", "evaluate", str(run), "--data", str(tmp_path / "other")])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code in (0, None)
    err = " ".join(capsys.readouterr().err.split())
    assert "warning: 11 of 21 images overlap" in err and "clean remainder (10 images)" in err

    metrics = json.loads((run / "metrics_report_external.json").read_text())
    ov = metrics["overlap"]
    assert (ov["n"], ov["identical"], ov["near_identical"], ov["overlapping"]) == (21, 10, 1, 11)
    assert len(ov["examples"]) == 5 and ov["clean"]["n"] == 10
    clean = json.loads((run / "metrics_report_external_clean.json").read_text())
    assert clean["pooled"]["n"] == 10 and metrics["pooled"]["n"] == 21
    assert ov["clean"]["accuracy"] == pytest.approx(clean["pooled"]["accuracy"])
    report = (run / "report_external.md").read_text()
    assert "11 of 21 images overlap the run's training/validation images" in report
    assert "clean remainder (10 images)" in report


def test_old_runs_rehash_their_training_images_and_clean_sets_pass(tiny_run, tmp_path):
    from oncotransfer.data.images import decode_many
    from oncotransfer.data.manifest import load_manifest
    from oncotransfer.data.overlap import find_overlap, overlap_line, training_reference
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    _other_set(run, tmp_path / "other")
    m = load_manifest(tmp_path / "other", min_classes=1)
    _, ok, _, ph = decode_many(m.paths, 128, phash=True)
    assert ok == list(range(21))
    saved = find_overlap(m.sha256, ph, training_reference(run, None, 128))
    # a run saved before split.csv kept hashes: they are recomputed from its training images, same answer
    split = pd.read_csv(run / "split.csv")
    split.drop(columns=["sha256", "phash"]).to_csv(run / "split.csv", index=False)
    ref = training_reference(run, None, 128)
    again = find_overlap(m.sha256, ph, ref)
    assert not ref.notes and ref.n == 60   # holdout selects its epoch on the test rows: all 60 were seen
    assert (int(again.identical.sum()), int(again.near.sum())) == (10, 1)
    assert (again.mask == saved.mask).all()
    new = np.array(["new_" in p for p in m.paths])
    assert (again.mask == ~new).all()
    summary = find_overlap([m.sha256[i] for i in np.nonzero(new)[0]], ph[new], ref).summary([], None)
    assert summary["overlapping"] == 0 and overlap_line(summary).startswith("Overlap with the run's training")


def _augmented_copies(run: Path, root: Path) -> tuple[list[str], int]:
    """Flipped, rotated (90, 180, 10 degrees), cropped (10%, 20%), padded and brightened copies of 8 of the run's
    training tiles, and the same transforms of 8 images it never saw (demo:busi ultrasound): (files, copies)."""
    from PIL import ImageEnhance
    split = pd.read_csv(run / "split.csv")
    demo = resolve_data_path("demo:osteosarcoma")
    train = split[split["subset"] == "train"].drop_duplicates("index").sort_values("index").head(8)
    unseen = sorted(resolve_data_path("demo:busi").rglob("*.jpg"))[:8]
    T = Image.Transpose

    def crop(f: float):
        return lambda im: im.crop((0, 0, round(im.width * (1 - f)), round(im.height * (1 - f))))

    def pad(im):
        out = Image.new("RGB", (im.width + 24, im.height + 24))
        out.paste(im, (12, 12))
        return out
    ops = [lambda im: im.transpose(T.FLIP_LEFT_RIGHT), lambda im: im.transpose(T.FLIP_TOP_BOTTOM),
           lambda im: im.transpose(T.ROTATE_90), lambda im: im.rotate(10, Image.BILINEAR), crop(0.1), crop(0.2),
           pad, lambda im: ImageEnhance.Brightness(im).enhance(1.3)]
    files = []
    for k, (src, op) in enumerate([(demo / r["path"], op) for (_, r), op in zip(train.iterrows(), ops)]
                                  + list(zip(unseen, ops))):
        dst = root / f"{'copy' if k < 8 else 'new'}_{k}.png"
        op(Image.open(src).convert("RGB")).save(dst)
        files.append(str(dst))
    return files, 8


def test_flipped_rotated_cropped_copies_of_training_images_are_named_and_distinct_images_not(tiny_run, tmp_path):
    from oncotransfer.data.keypoints import KEYPOINTS_FILE, describe_files
    from oncotransfer.data.manifest import sha256_file
    from oncotransfer.data.overlap import find_overlap, training_reference
    assert (tiny_run / KEYPOINTS_FILE).is_file()   # written at train time
    files, n_copies = _augmented_copies(tiny_run, tmp_path)
    shas = [sha256_file(f) for f in files]
    ref = training_reference(tiny_run, None, 128)
    q = describe_files(files, mirrored=True)
    ov = find_overlap(shas, None, ref, q)
    expected = np.arange(len(files)) < n_copies
    assert ov.mask.tolist() == expected.tolist()
    s = ov.summary([Path(f).name for f in files], None)
    assert s["overlapping"] == n_copies and s["identical"] == 0 and s["by_keypoints"] >= 1
    # the old check (pHash of one orientation) named none of the flips or quarter-turns
    old = find_overlap(shas, q.phashes[:, 0].copy(), ref)
    assert not old.mask[:3].any()


def test_runs_without_saved_keypoints_fall_back_and_say_what_is_not_checked(tiny_run, tmp_path, monkeypatch):
    from oncotransfer.data import overlap
    from oncotransfer.data.keypoints import KEYPOINTS_FILE, describe_files
    from oncotransfer.data.overlap import find_overlap, training_reference
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / KEYPOINTS_FILE).unlink()
    files, n_copies = _augmented_copies(run, tmp_path)
    q = describe_files(files, mirrored=True)
    # training images still where the run found them: their keypoints are computed again, same answer
    ref = training_reference(run, None, 128)
    assert ref.keypoints is not None and not ref.notes
    assert find_overlap(["-"] * len(files), None, ref, q).mask.sum() == n_copies
    # training images gone: byte hash and the dihedral pHash still catch flips and quarter-turns, and say so
    monkeypatch.setattr(overlap, "_data_root", lambda run_dir: tmp_path / "gone")
    ref = training_reference(run, None, 128)
    assert ref.keypoints is None and any("keypoints" in n for n in ref.notes)
    ov = find_overlap(["-"] * len(files), None, ref, q)
    assert ov.mask[:3].all() and not ov.mask[n_copies:].any()
