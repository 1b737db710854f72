"""The shipped demo configs on real images.

configs/demo.yaml (`make demo`): the built-in BUSI ultrasound set, duplicate-grouped 5-fold, clearly above the
majority class. configs/osteosarcoma_lopo.yaml on the 60 real TCIA tiles: >= 75% with a stratified image-level
5-fold split, and the honest leave-one-patient-out split (epoch chosen on an inner patient-level validation split
that leaves every class in training) is reported as patient-grouped, warns about the confounding, and scores
lower."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from oncotransfer.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "osteosarcoma-tcia-60"

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_demo_config_on_the_built_in_busi_set(tmp_path):
    from oncotransfer.experiments.run import run_experiment
    cfg = load_config(ROOT / "configs" / "demo.yaml", [f"train.cache_dir={tmp_path / 'cache'}",
                                                       f"output_dir={tmp_path / 'runs'}", "evaluate.bootstrap=200"])
    assert cfg.data.path == "demo:busi"
    result = run_experiment(cfg, tmp_path / "demo")
    run = json.loads((result.run_dir / "run.json").read_text())
    proto = run["protocol"]
    assert proto["folds"] == 5 and proto["grouped_by"] == "duplicates" and proto["selection_on_test"] is False
    assert all(t is not None for t in run["temperatures"].values())  # calibrated on each fold's validation subset
    majority = 218 / 323
    assert result.accuracy >= 0.75 > majority + 0.05, f"demo accuracy {result.accuracy:.3f}"
    assert result.metrics["pooled"]["roc_auc"] >= 0.8


@pytest.mark.skipif(not (DATA / "manifest.csv").is_file(), reason="../shared/data is absent")
def test_osteosarcoma_config_kfold_and_lopo(tmp_path):
    from oncotransfer.experiments.run import run_experiment
    config = ROOT / "configs" / "osteosarcoma_lopo.yaml"
    common = [f"data.path={DATA}", f"train.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'runs'}",
              "evaluate.bootstrap=200"]
    kfold_cfg = load_config(config, common + [
        "split.kind=kfold", "split.folds=5", "split.group_by_patient=false", "split.allow_image_level_split=true"])
    kfold = run_experiment(kfold_cfg, tmp_path / "kfold")
    run = json.loads((kfold.run_dir / "run.json").read_text())
    assert run["protocol"]["folds"] == 5 and run["protocol"]["image_level"] is True
    assert kfold.accuracy >= 0.75, f"stratified 5-fold accuracy {kfold.accuracy:.3f} < 0.75"

    lopo = run_experiment(load_config(config, common), tmp_path / "lopo")   # the shipped protocol: lopo
    run = json.loads((lopo.run_dir / "run.json").read_text())
    proto = run["protocol"]
    assert proto["split"] == "lopo" and proto["grouped_by"] == "patient" and proto["image_level"] is False
    assert proto["folds"] == 4
    assert proto["selection_on_test"] is False   # the epoch is chosen on held-out training patients
    split = pd.read_csv(lopo.run_dir / "split.csv")
    assert (split.subset == "val").any()
    for fold, rows in split[split.subset == "train"].groupby("fold"):
        assert rows.label.nunique() == 3, f"fold {fold} trains without a class"
    assert lopo.accuracy < kfold.accuracy
    report = (lopo.run_dir / "report.md").read_text()
    assert "Best epoch selected on an inner patient-level validation split" in report
    warned = [w for w in run["warnings"] if "comes from only 2 patient(s)" in w]
    assert len(warned) == 2 and all(w in report for w in warned)
