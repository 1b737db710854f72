"""Calibrated probabilities carried into predict, export and serve (a fold model with a fitted temperature)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from oncotransfer.data.demo import demo_path

IMAGES = sorted(demo_path("osteosarcoma").rglob("*.jpg"))[:4]


def test_predictor_is_softmax_of_logits_over_t(kfold_run):
    from oncotransfer.infer.predict import Predictor
    run, _ = kfold_run
    pred = Predictor.from_run(run, engine="torch", fold=1)
    t = json.loads((run / "run.json").read_text())["temperatures"]["1"]
    assert pred.temperature == t and pred.members == [{"fold": 1, "temperature": t}]
    x = pred.normalised(pred.to_uint8([Image.open(p) for p in IMAGES]))
    with torch.inference_mode():
        logits = pred.model(x)
    got = pred.probabilities(x)
    np.testing.assert_allclose(got, torch.softmax(logits / t, 1).numpy(), atol=1e-6)
    assert not np.allclose(got, torch.softmax(logits, 1).numpy(), atol=1e-3)  # T really differs from 1 here


def test_old_checkpoint_without_temperature_loads_uncalibrated(run_copy):
    from oncotransfer.infer.predict import Predictor
    meta_path = run_copy / "checkpoint" / "meta.json"
    meta = json.loads(meta_path.read_text())
    for key in ("temperature", "folds"):
        meta.pop(key)
    meta_path.write_text(json.dumps(meta))
    pred = Predictor.from_run(run_copy, engine="torch")
    assert pred.temperature is None and len(pred.members) == 1 and not pred.ensemble.calibrated
    x = torch.randn(2, 3, pred.size, pred.size)
    with torch.inference_mode():
        np.testing.assert_allclose(pred.probabilities(x), torch.softmax(pred.model(x), 1).numpy(), atol=1e-6)


def test_onnx_export_of_a_calibrated_model_matches_calibrated_torch(run_copy):
    from oncotransfer.infer.export import export_run
    from oncotransfer.infer.predict import Predictor
    export_run(run_copy, "onnx", fold=0)
    info = json.loads((run_copy / "export" / "model.json").read_text())
    t = json.loads((run_copy / "run.json").read_text())["temperatures"]["0"]
    assert info["temperature"] == t and info["members"] == [{"fold": 0, "temperature": t}]
    assert info["parity"]["max_abs_diff"] <= 1e-4
    onnx = Predictor.from_run(run_copy, engine="onnx", fold=0)
    torch_pred = Predictor.from_run(run_copy, engine="torch", fold=0)
    imgs = [Image.open(p) for p in IMAGES]
    np.testing.assert_allclose(onnx.predict_images(imgs), torch_pred.predict_images(imgs), atol=1e-4)
    assert onnx.onnx_path == run_copy / "export" / "model.onnx"  # the export of fold 0 alone, used as it is
    # the ensemble (default) is not what this export holds: exported again, then used
    lines: list[str] = []
    assert Predictor.from_run(run_copy, engine="auto", log=lines.append).engine == "onnx"
    assert "it holds fold model(s) [0], not [0, 1, 2]" in lines[0]
    assert len(json.loads((run_copy / "export" / "model.json").read_text())["members"]) == 3


def test_serve_health_reports_the_temperature(kfold_run):
    from oncotransfer.serve.app import create_app
    run, _ = kfold_run
    t = json.loads((run / "run.json").read_text())["temperatures"]["2"]
    h = TestClient(create_app(run, engine="torch", fold=2)).get("/health").json()
    assert h["temperature"] == t and h["calibrated"] is True and h["members"] == [{"fold": 2, "temperature": t}]
