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
    """10 byte copies of the run's training images, 1 resized and recompressed copy, 10 rotated (new) images."""
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
    for _, r in split.drop_duplicates("index").tail(10).iterrows():
        (root / r["label"]).mkdir(parents=True, exist_ok=True)
        Image.open(demo / r["path"]).transpose(Image.Transpose.ROTATE_90).save(
            root / r["label"] / ("new_" + Path(r["path"]).stem + ".png"))
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
