"""A real k-fold run fits its temperature on validation rows only, never on test rows: with small validation
subsets (these have 10 images a fold) one temperature on the pooled validation rows of all folds."""
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
    assert len(set(temps.values())) == 1  # pooled: the same temperature in every fold
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
    assert c["fitted_on"] == info["calibration"]["fitted_on"] and c["fitted_on"].startswith("pooled validation")
    assert c["mode"] == "pooled" and c["requested"] == "auto" and c["at_bound"] == {}
    assert metrics["selective"]["confidence"] == "top calibrated probability"
    md = (run / "report.md").read_text()
    assert "Calibration error (ECE, 15 bins)" in md and "after temperature scaling" in md
    assert f"T = {temps['0']:.3f} fitted on the pooled validation subsets of 3 folds" in md
    assert "at least 200 validation images" in md  # the rule, in the protocol box
    assert (run / "plots" / "reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_temperature_is_fitted_on_exactly_the_validation_rows(kfold_run):
    from oncotransfer.data.images import decode_many, normalise
    from oncotransfer.data.manifest import resolve_data_path
    from oncotransfer.models.factory import load_classifier
    run, calls = kfold_run
    assert len(calls) == 4  # each fold's own rows (recorded as per_fold_fits), then all of them pooled
    info = json.loads((run / "run.json").read_text())
    pooled_z, pooled_y = calls[3]
    np.testing.assert_array_equal(pooled_z, np.concatenate([z for z, _ in calls[:3]]))
    np.testing.assert_array_equal(pooled_y, np.concatenate([y for _, y in calls[:3]]))
    cal = info["calibration"]
    assert cal["n_val"] == {str(k): len(calls[k][1]) for k in range(3)} and cal["n_val_total"] == len(pooled_y)
    assert cal["temperature"] == info["temperatures"]["0"]
    split = pd.read_csv(run / "split.csv")
    classes = _classes(run)
    root = resolve_data_path("demo:osteosarcoma")
    for k, (logits, y) in enumerate(calls[:3]):
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


def _two_fold(tmp_path, **evaluate):
    from oncotransfer.config import validate
    return validate({"name": "c", "output_dir": str(tmp_path / "runs"),
                     "data": {"path": "demo:osteosarcoma", "image_size": 32},
                     "split": {"kind": "kfold", "folds": 2, "val_size": 0.25, "allow_image_level_split": True,
                               "group_by_patient": False},
                     "model": {"backbone": "efficientnet_lite0", "weights": "none", "freeze": "frozen"},
                     "train": {"epochs": 2, "cache_dir": str(tmp_path / "cache"), "num_workers": 0,
                               "feature_engine": "torch"},
                     "evaluate": {"bootstrap": 0, **evaluate}})


def test_calibration_modes_change_only_the_calibrated_columns(tmp_path):
    """Off, pooled (auto: 7-8 validation images a fold) and per fold: the same run but for the cal_prob columns
    and the temperatures, so accuracy (from prob_<class>) is unchanged."""
    from oncotransfer.experiments.run import run_experiment
    runs = {mode: run_experiment(_two_fold(tmp_path, **kw), report=False).run_dir for mode, kw in
            {"auto": {}, "off": {"calibrate": False}, "per_fold": {"calibration": "per_fold"}}.items()}
    frames = {mode: pd.read_csv(run / "predictions.csv") for mode, run in runs.items()}
    info = {mode: json.loads((run / "run.json").read_text()) for mode, run in runs.items()}
    assert any(c.startswith("cal_prob_") for c in frames["auto"].columns)
    for mode in ("auto", "per_fold"):
        pd.testing.assert_frame_equal(frames[mode][frames["off"].columns], frames["off"])
    assert info["off"]["temperatures"] == {"0": None, "1": None} and info["off"]["calibration"]["mode"] is None
    auto, per = info["auto"]["calibration"], info["per_fold"]["calibration"]
    assert auto["mode"] == "pooled" and per["mode"] == "per_fold" and per["requested"] == "per_fold"
    assert info["per_fold"]["temperatures"] == per["per_fold_fits"] == auto["per_fold_fits"]
    assert info["auto"]["temperatures"] == {"0": auto["temperature"], "1": auto["temperature"]}
    meta = json.loads((runs["auto"] / "checkpoint" / "meta.json").read_text())
    assert [f["temperature"] for f in meta["folds"]] == [auto["temperature"]] * 2  # predict/serve read these


def test_a_temperature_at_its_bound_warns_on_the_terminal_and_in_the_report(tmp_path, monkeypatch):
    from oncotransfer.experiments.run import run_experiment
    from oncotransfer.train import temperature
    monkeypatch.setattr(temperature, "fit_temperature", lambda z, y, sigmoid: temperature.T_MIN)
    lines = []
    res = run_experiment(_two_fold(tmp_path), log=lines.append)
    warned = [line for line in lines if "lower bound" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: calibration: temperature T = 0.05")
    info = json.loads((res.run_dir / "run.json").read_text())
    assert info["calibration"]["at_bound"] == {"pooled": "lower"}
    assert any("lower bound" in w for w in info["warnings"])
    assert res.metrics["calibration"]["at_bound"] == {"pooled": "lower"}
    md = (res.run_dir / "report.md").read_text()
    warnings = md[md.index("## Warnings"):md.index("## Set-up")]
    assert "lower bound" in warnings and "⚠ at a bound of the fitted range" in md
