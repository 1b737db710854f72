"""A real k-fold run fits one temperature per fold on that fold's validation rows, and never on test rows."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch


def _classes(run):
    return json.loads((run / "run.json").read_text())["classes"]


def test_temperatures_cal_columns_and_ece_keys(kfold_run):
    run, _ = kfold_run
    info = json.loads((run / "run.json").read_text())
    temps = info["temperatures"]
    assert set(temps) == {"0", "1", "2"} and all(isinstance(t, float) and t > 0 for t in temps.values())
    assert not any("not calibrated" in w for w in info["warnings"])
    meta = json.loads((run / "checkpoint" / "meta.json").read_text())
    assert meta["temperature"] == temps["0"]
    classes = _classes(run)
    pred = pd.read_csv(run / "predictions.csv")
    for fold, part in pred.groupby("fold"):
        p = part[[f"prob_{c}" for c in classes]].to_numpy()
        cal = part[[f"cal_prob_{c}" for c in classes]].to_numpy()
        # softmax(z / T) == softmax(log softmax(z) / T): the calibrated columns are the same logits over T
        z = np.log(p) / temps[str(fold)]
        expected = np.exp(z - z.max(1, keepdims=True))
        np.testing.assert_allclose(cal, expected / expected.sum(1, keepdims=True), atol=1e-5)
    metrics = json.loads((run / "metrics.json").read_text())
    c = metrics["calibration"]
    assert metrics["pooled"]["ece"] == pytest.approx(c["ece_before"])
    assert 0 <= c["ece_after"] <= 1 and c["temperatures"] == temps
    assert c["fitted_on"] == "validation subset of each fold"
    md = (run / "report.md").read_text()
    assert "Calibration error (ECE, 15 bins)" in md and "after temperature scaling" in md
    assert (run / "plots" / "reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_temperature_is_fitted_on_exactly_the_validation_rows(kfold_run):
    from oncotransfer.data.images import decode_many, normalise
    from oncotransfer.data.manifest import resolve_data_path
    from oncotransfer.models.factory import load_classifier
    run, calls = kfold_run
    assert len(calls) == 3
    split = pd.read_csv(run / "split.csv")
    classes = _classes(run)
    root = resolve_data_path("demo:osteosarcoma")
    for k, (logits, y) in enumerate(calls):
        val = split[(split["fold"] == k) & (split["subset"] == "val")].sort_values("index")
        test = split[(split["fold"] == k) & (split["subset"] == "test")]
        assert len(val) and not set(val["index"]) & set(test["index"])
        assert list(y) == [classes.index(c) for c in val["label"]]
        # and the logits are the fold model's on those images (not on the test images)
        model, meta = load_classifier(run, fold=k)
        images = decode_many([str(root / p) for p in val["path"]], 64)[0]
        with torch.inference_mode():
            z = model(normalise(images, model.spec.mean, model.spec.std)).numpy()
        np.testing.assert_allclose(logits, z, atol=1e-4)
        assert meta["temperature"] == json.loads((run / "run.json").read_text())["temperatures"][str(k)]


def test_no_validation_split_means_no_temperature(tiny_run, tmp_path):
    from oncotransfer.evaluate.report import evaluate_run
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    info = json.loads((run / "run.json").read_text())
    assert info["temperatures"] == {"0": None}
    assert any(w.startswith("not calibrated: no validation split") for w in info["warnings"])
    assert not any(c.startswith("cal_prob_") for c in pd.read_csv(run / "predictions.csv").columns)
    assert json.loads((run / "checkpoint" / "meta.json").read_text())["temperature"] is None
    metrics = evaluate_run(run)
    assert metrics["calibration"]["ece_after"] is None and metrics["pooled"]["ece"] >= 0
    assert "not calibrated: no validation split" in (run / "report.md").read_text()


def test_calibrate_false_keeps_probabilities_and_fits_nothing(tmp_path):
    """With calibration off the run is the same as with it on, minus the cal_prob columns."""
    from oncotransfer.config import validate
    from oncotransfer.experiments.run import run_experiment
    base = {"name": "c", "output_dir": str(tmp_path / "runs"),
            "data": {"path": "demo:osteosarcoma", "image_size": 32},
            "split": {"kind": "kfold", "folds": 2, "val_size": 0.25, "allow_image_level_split": True,
                      "group_by_patient": False},
            "model": {"backbone": "efficientnet_lite0", "weights": "none", "freeze": "frozen"},
            "train": {"epochs": 2, "cache_dir": str(tmp_path / "cache"), "num_workers": 0, "feature_engine": "torch"},
            "evaluate": {"bootstrap": 0}}
    on = run_experiment(validate(base), report=False).run_dir
    off = run_experiment(validate({**base, "evaluate": {"bootstrap": 0, "calibrate": False}}), report=False).run_dir
    a, b = pd.read_csv(on / "predictions.csv"), pd.read_csv(off / "predictions.csv")
    assert any(c.startswith("cal_prob_") for c in a.columns)
    pd.testing.assert_frame_equal(a[b.columns], b)
    assert json.loads((off / "run.json").read_text())["temperatures"] == {"0": None, "1": None}
