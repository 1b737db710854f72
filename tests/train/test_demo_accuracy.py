"""The demo config on the 60 real TCIA tiles: >= 75% with a stratified image-level 5-fold split, and the
honest leave-one-patient-out split (epoch chosen on an inner patient-level validation split) is reported as
patient-grouped and scores lower."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from oncotransfer.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parents[2].parent / "shared" / "data" / "osteosarcoma-tcia-60"

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (DATA / "manifest.csv").is_file(), reason="../shared/data is absent"),
              pytest.mark.usefixtures("one_thread")]


def test_demo_config_kfold_and_lopo(tmp_path):
    from oncotransfer.experiments.run import run_experiment
    common = [f"data.path={DATA}", f"train.cache_dir={tmp_path / 'cache'}", f"output_dir={tmp_path / 'runs'}",
              "evaluate.bootstrap=200"]
    kfold_cfg = load_config(ROOT / "configs" / "demo.yaml", common + [
        "split.kind=kfold", "split.folds=5", "split.group_by_patient=false", "split.allow_image_level_split=true"])
    kfold = run_experiment(kfold_cfg, tmp_path / "kfold")
    run = json.loads((kfold.run_dir / "run.json").read_text())
    assert run["protocol"]["folds"] == 5 and run["protocol"]["image_level"] is True
    assert kfold.accuracy >= 0.75, f"stratified 5-fold accuracy {kfold.accuracy:.3f} < 0.75"

    lopo_cfg = load_config(ROOT / "configs" / "demo.yaml", common)   # the shipped protocol: lopo
    lopo = run_experiment(lopo_cfg, tmp_path / "lopo")
    proto = json.loads((lopo.run_dir / "run.json").read_text())["protocol"]
    assert proto["split"] == "lopo" and proto["grouped_by"] == "patient" and proto["image_level"] is False
    assert proto["folds"] == 4
    assert proto["selection_on_test"] is False   # the epoch is chosen on held-out training patients
    split = (lopo.run_dir / "split.csv").read_text()
    assert ",val," in split
    assert lopo.accuracy < kfold.accuracy
    report = (lopo.run_dir / "report.md").read_text()
    assert "Best epoch selected on an inner patient-level validation split" in report
