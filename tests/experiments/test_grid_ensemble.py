"""Grid cells whose trials share the split get the metrics of the trials' averaged test probabilities."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from synthetic import TWO, colour_images, tiny_grid
from oncotransfer.evaluate.metrics import classification_metrics
from oncotransfer.experiments import load_grid, run_grid


def test_cell_ensemble_columns_are_the_metrics_of_averaged_trials(tmp_path: Path) -> None:
    colour_images(tmp_path / "img", TWO, 8, 40, noise=60.0)
    spec = load_grid(tiny_grid(tmp_path, {"train.lr": [0.01]}, trials=3))
    summary = run_grid(spec, grid_dir=tmp_path / "g", workers=1)
    row = summary.iloc[0]
    runs = sorted((tmp_path / "g" / "runs").iterdir())
    frames = [pd.read_csv(d / "predictions.csv") for d in runs]
    classes = json.loads((runs[0] / "run.json").read_text())["classes"]
    cols = [f"prob_{c}" for c in classes]  # holdout without validation: uncalibrated
    mean = np.mean([f[cols].to_numpy() for f in frames], axis=0)
    y = np.array([classes.index(c) for c in frames[0]["label"]])
    m = classification_metrics(y, mean, classes, bootstrap=0)
    assert row["ensemble_trials"] == 3 and row["ensemble_probabilities"] == "uncalibrated"
    assert row["ensemble_accuracy"] == pytest.approx(m["accuracy"])
    assert row["ensemble_roc_auc"] == pytest.approx(m["roc_auc"])
    assert "ensemble_accuracy" in pd.read_csv(tmp_path / "g" / "summary.csv").columns


def test_no_ensemble_when_trials_change_the_split(tmp_path: Path) -> None:
    colour_images(tmp_path / "img", TWO, 8, 40)
    spec = load_grid(tiny_grid(tmp_path, {"train.lr": [0.01]}, trials=2, trial_keys=["split.seed"]))
    summary = run_grid(spec, grid_dir=tmp_path / "g", workers=1)
    runs = sorted((tmp_path / "g" / "runs").iterdir())
    paths = [set(pd.read_csv(d / "predictions.csv")["path"]) for d in runs]
    assert paths[0] != paths[1]  # the test rows differ, so averaging them means nothing
    assert "ensemble_accuracy" not in summary.columns
