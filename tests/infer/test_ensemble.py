"""Every fold's model is kept; predict, evaluate, export and serve use their ensemble by default."""
from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import load_file

from oncotransfer.io import sha256_file
from oncotransfer.data.demo import demo_path
from oncotransfer.data.manifest import resolve_data_path

IMAGES = sorted(demo_path("osteosarcoma").rglob("*.jpg"))[:5]


def test_fold_files_hold_only_the_head_of_a_frozen_run(kfold_run):
    run, _ = kfold_run
    fold0 = load_file(str(run / "checkpoint" / "model.safetensors"))
    meta = json.loads((run / "checkpoint" / "meta.json").read_text())
    temps = json.loads((run / "run.json").read_text())["temperatures"]
    files = ["model.safetensors" if k == 0 else f"folds/fold{k}.safetensors" for k in range(3)]
    assert [{key: f[key] for key in ("fold", "file", "temperature")} for f in meta["folds"]] == [
        {"fold": k, "file": files[k], "temperature": temps[str(k)]} for k in range(3)]
    # each member file's digest and size, so that a damaged or swapped file is named when the run is loaded
    assert [(f["sha256"], f["bytes"]) for f in meta["folds"]] == [
        (sha256_file(run / "checkpoint" / name), (run / "checkpoint" / name).stat().st_size) for name in files]
    heads = {k for k in fold0 if k.startswith("head.")}
    for k in (1, 2):
        tensors = load_file(str(run / "checkpoint" / "folds" / f"fold{k}.safetensors"))
        # the frozen backbone is fold 0's: not stored again; a head tensor that came out identical is not either
        assert tensors and set(tensors) <= heads
        assert all(not (tensors[n] == fold0[n]).all() for n in tensors)


def test_loading_fold_k_reproduces_its_test_predictions(kfold_run):
    from oncotransfer.infer.predict import Predictor
    run, _ = kfold_run
    saved = pd.read_csv(run / "predictions.csv")
    classes = json.loads((run / "run.json").read_text())["classes"]
    root = resolve_data_path("demo:osteosarcoma")
    for k in range(3):
        rows = saved[saved["fold"] == k]
        pred = Predictor.from_run(run, engine="torch", fold=k)
        from oncotransfer.data.images import decode_many
        x = pred.normalised(decode_many([str(root / p) for p in rows["path"]], pred.size)[0])
        raw, cal = pred.probability_pair(x)
        np.testing.assert_allclose(raw, rows[[f"prob_{c}" for c in classes]].to_numpy(), atol=1e-5)
        np.testing.assert_allclose(cal, rows[[f"cal_prob_{c}" for c in classes]].to_numpy(), atol=1e-5)


def test_ensemble_is_the_mean_of_its_members_and_runs_the_backbone_once(kfold_run, monkeypatch):
    from oncotransfer.infer.predict import Predictor
    run, _ = kfold_run
    ens = Predictor.from_run(run, engine="torch")
    assert [m["fold"] for m in ens.members] == [0, 1, 2] and ens.ensemble.shares_backbone
    assert "ensemble of 3 fold models" in ens.describe()
    imgs = [Image.open(p) for p in IMAGES]
    members = [Predictor.from_run(run, engine="torch", fold=k).predict_images(imgs) for k in range(3)]
    got = ens.predict_images(imgs)
    np.testing.assert_allclose(got, np.mean(members, axis=0), atol=1e-6)
    calls = []
    backbone = ens.ensemble.members[0].backbone
    real = backbone.forward
    monkeypatch.setattr(backbone, "forward", lambda x: calls.append(1) or real(x))
    ens.predict_images(imgs)
    assert len(calls) == 1


def test_onnx_ensemble_export_parity(run_copy):
    from oncotransfer.infer.export import export_run
    from oncotransfer.infer.predict import Predictor
    path = export_run(run_copy, "onnx")
    info = json.loads((run_copy / "export" / "model.json").read_text())
    assert [m["fold"] for m in info["members"]] == [0, 1, 2] and "ensemble of 3" in info["model"]
    assert info["parity"]["max_abs_diff"] <= 1e-4 and path.name == "model.onnx"
    onnx = Predictor.from_run(run_copy)  # auto: the export holds the same members
    assert onnx.engine == "onnx" and len(onnx.members) == 3
    imgs = [Image.open(p) for p in IMAGES]
    np.testing.assert_allclose(onnx.predict_images(imgs), Predictor.from_run(run_copy, "torch").predict_images(imgs),
                               atol=1e-4)
    one = Predictor.from_run(run_copy, fold=1)  # one member: exported on its own, the ensemble's export kept
    assert one.engine == "onnx" and one.onnx_path.parent.name == "fold1" and path.is_file()


def test_predict_and_serve_default_to_the_ensemble_fold_0_is_one_model(kfold_run, tmp_path, monkeypatch, capsys):
    from oncotransfer import cli
    from oncotransfer.infer.predict import Predictor
    from oncotransfer.serve.app import create_app
    run, _ = kfold_run
    folder = tmp_path / "in"
    folder.mkdir()
    for p in IMAGES:
        shutil.copy(p, folder / p.name)
    outs = {}
    for name, extra in (("ens", []), ("f0", ["--fold", "0"])):
        out = tmp_path / f"{name}.csv"
        monkeypatch.setattr(sys, "argv", ["oncotransfer", "predict", str(run), str(folder), "--out", str(out),
                                          "--engine", "torch", *extra])
        with pytest.raises(SystemExit) as e:
            cli.main()
        assert e.value.code in (0, None), capsys.readouterr().err
        outs[name] = pd.read_csv(out).sort_values("path")
    cols = [c for c in outs["ens"].columns if c.startswith("prob_")]
    imgs = [Image.open(folder / p) for p in [p.rsplit("/", 1)[-1] for p in outs["ens"]["path"]]]
    np.testing.assert_allclose(outs["ens"][cols].to_numpy(), Predictor.from_run(run, "torch").predict_images(imgs),
                               atol=1e-5)
    np.testing.assert_allclose(outs["f0"][cols].to_numpy(),
                               Predictor.from_run(run, "torch", fold=0).predict_images(imgs), atol=1e-5)
    assert not np.allclose(outs["ens"][cols].to_numpy(), outs["f0"][cols].to_numpy(), atol=1e-4)
    ens = TestClient(create_app(run, engine="torch")).get("/health").json()
    one = TestClient(create_app(run, engine="torch", fold=0)).get("/health").json()
    assert len(ens["members"]) == 3 and "ensemble of 3" in ens["ensemble"] and ens["temperature"] is None
    assert len(one["members"]) == 1 and one["temperature"] == one["members"][0]["temperature"]


def test_evaluate_other_data_scores_the_ensemble(run_copy):
    from oncotransfer.infer.external import evaluate_on
    metrics = evaluate_on(run_copy, "demo:osteosarcoma")
    assert "ensemble of 3 fold models" in metrics["scored_by"]
    assert metrics["calibration"]["ece_after"] is not None and metrics["pooled"]["ece"] >= 0
    md = (run_copy / "report_external.md").read_text()
    assert "Scored by: ensemble of 3 fold models" in md
    # the external report says how far to trust the ensemble's answers too (its calibrated confidence)
    assert metrics["selective"]["confidence"] == "top calibrated probability" and "## Selective prediction" in md
    assert (run_copy / "plots" / "selective_report_external.png").is_file()
    one = evaluate_on(run_copy, "demo:osteosarcoma", fold=2)
    assert one["scored_by"].startswith("fold 2 model")
    assert one["pooled"]["accuracy"] != metrics["pooled"]["accuracy"] or one["pooled"]["ece"] != metrics["pooled"]["ece"]


def test_missing_fold_file_and_unknown_fold_are_one_line_errors(run_copy):
    from oncotransfer.errors import CheckpointError
    from oncotransfer.infer.predict import Predictor
    with pytest.raises(CheckpointError, match="--fold 7: the checkpoint holds fold"):
        Predictor.from_run(run_copy, fold=7)
    (run_copy / "checkpoint" / "folds" / "fold2.safetensors").unlink()
    with pytest.raises(CheckpointError, match="fold 2's model folds/fold2.safetensors is missing"):
        Predictor.from_run(run_copy)
