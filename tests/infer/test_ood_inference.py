"""Out-of-distribution scores from training to predict, evaluate, export and abstention (real tiny runs)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from oncotransfer.data.demo import demo_path
from oncotransfer.errors import ConfigError

TILES = sorted(demo_path("osteosarcoma").rglob("*.jpg"))[:12]
ULTRASOUND = sorted(demo_path("bus250").rglob("*.png"))[:12] or sorted(demo_path("bus250").rglob("*.bmp"))[:12]


def test_a_run_fits_one_detector_per_fold_and_scores_its_test_folds(kfold_run):
    run, _ = kfold_run
    meta = json.loads((run / "checkpoint" / "ood.json").read_text())
    assert meta["detector"] == "knn" and [m["fold"] for m in meta["members"]] == [0, 1, 2]
    assert all(m["threshold"] is not None and m["n_val"] > 0 for m in meta["members"])
    preds = pd.read_csv(run / "predictions.csv")
    assert preds["ood_score"].notna().all() and set(preds["in_distribution"].astype(str)) <= {"True", "False"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["ood"]["scored"] == len(preds) and metrics["ood"]["detector"]["detector"] == "knn"
    assert "## Out of distribution" in (run / "report.md").read_text()
    # the test fold's scores are its own fold model's: the threshold is that member's
    for k, m in enumerate(meta["members"]):
        part = preds[preds["fold"] == k]
        assert ((part["ood_score"] <= m["threshold"]) == (part["in_distribution"].astype(str) == "True")).all()


def test_ultrasound_images_are_flagged_by_an_osteosarcoma_model(kfold_run):
    from oncotransfer.infer.predict import Predictor
    pred = Predictor.from_run(kfold_run[0], engine="torch")
    probs, ood = pred.predict_with_ood(pred.to_uint8([Image.open(p) for p in TILES + ULTRASOUND]))
    flags = pred.in_distribution(ood)
    n = len(TILES)
    # a 64 px, 3-epoch fixture: most, not all (at 96 px every BUS-250 image is flagged; benchmarks/ood.py)
    assert flags[n:].sum() <= 2, "ultrasound images must be flagged"
    assert flags[:n].mean() >= 0.75 and np.median(ood[n:]) > ood[:n].max()
    noise = np.random.default_rng(0).integers(0, 256, (4, 3, pred.size, pred.size), dtype=np.uint8)
    import torch
    assert not pred.in_distribution(pred.predict_with_ood(torch.as_tensor(noise))[1]).any()


def test_abstain_refers_out_of_distribution_and_unsure_images(kfold_run, tmp_path):
    from oncotransfer.infer.predict import run_predict
    df, errors = run_predict(kfold_run[0], [str(p) for p in TILES[:4] + ULTRASOUND[:4]], tmp_path / "p.csv",
                             engine="torch", abstain=True, coverage=0.9)
    assert not errors
    saved = pd.read_csv(tmp_path / "p.csv")
    us = saved["path"].str.contains("bus250")
    out = saved["in_distribution"].astype(str) == "False"
    assert out[us].sum() >= 3 and saved.loc[out, "refer"].all()
    assert (saved["refer_reason"].fillna("").str.contains("out of distribution") == out).all()
    assert (saved["refer"] == (out | saved["refer_reason"].fillna("").str.contains("low confidence"))).all()
    assert set(saved.columns) >= {"ood_score", "in_distribution", "refer", "refer_reason"}
    with pytest.raises(ConfigError, match="--coverage 1.5"):
        run_predict(kfold_run[0], [str(TILES[0])], tmp_path / "q.csv", engine="torch", abstain=True, coverage=1.5)


def test_onnx_export_carries_the_same_scores_and_an_old_export_is_not_used(run_copy):
    from oncotransfer.infer.export import export_run
    from oncotransfer.infer.predict import Predictor
    export_run(run_copy, "onnx")
    info = json.loads((run_copy / "export" / "model.json").read_text())
    assert info["ood"]["output"] == "ood_score" and info["ood"]["detector"] == "knn"
    images = [Image.open(p) for p in TILES[:6] + ULTRASOUND[:6]]
    torch_pred, onnx_pred = Predictor.from_run(run_copy, "torch"), Predictor.from_run(run_copy, "auto")
    assert onnx_pred.engine == "onnx"
    (p1, o1), (p2, o2) = (pr.predict_with_ood(pr.to_uint8(images)) for pr in (torch_pred, onnx_pred))
    np.testing.assert_allclose(o1, o2, atol=1e-4)
    np.testing.assert_allclose(p1, p2, atol=1e-4)
    assert info["ood"]["threshold"] == pytest.approx(torch_pred.ood.threshold)
    info.pop("ood")  # an export written before the run had a detector: stale, made again (never used as it is)
    (run_copy / "export" / "model.json").write_text(json.dumps(info))
    lines: list[str] = []
    assert Predictor.from_run(run_copy, "onnx", log=lines.append).engine == "onnx"
    assert "without the run's out-of-distribution detector" in lines[0]
    assert json.loads((run_copy / "export" / "model.json").read_text())["ood"]["output"] == "ood_score"


def test_evaluate_data_reports_the_flagged_share(run_copy):
    from oncotransfer.infer.external import evaluate_on
    m = evaluate_on(run_copy, "demo:osteosarcoma")
    ood = m["ood"]
    assert ood["scored"] == 60 and 0 <= ood["flagged"] <= 60
    assert ood["in_distribution"]["n"] + ood["out_of_distribution"]["n"] == 60
    assert "Flagged out of distribution" in (run_copy / "report_external.md").read_text()


def test_a_split_without_validation_images_scores_but_flags_nothing(tiny_run):
    preds = pd.read_csv(tiny_run / "predictions.csv")
    assert preds["ood_score"].notna().all() and preds["in_distribution"].isna().all()
    info = json.loads((tiny_run / "run.json").read_text())
    assert any("out-of-distribution threshold not set" in w for w in info["warnings"])


def test_unknown_detector_fails_before_a_run_folder(tmp_path):
    from oncotransfer.config import validate
    from oncotransfer.experiments.run import run_experiment
    cfg = validate({"name": "x", "output_dir": str(tmp_path / "runs"), "data": {"path": "demo:osteosarcoma"},
                    "evaluate": {"ood": "knnn"}}, "test")
    with pytest.raises(ConfigError, match="unknown detector 'knnn'"):
        run_experiment(cfg)
    assert not (tmp_path / "runs").exists()


def _as_class_folder(tmp_path, images, cls="Non-Tumor"):
    import shutil
    folder = tmp_path / "other" / cls
    folder.mkdir(parents=True)
    for p in images:
        shutil.copy(p, folder / p.name)
    return str(tmp_path / "other")


def test_shift_test_flags_other_images_and_not_the_training_distribution(run_copy, tmp_path):
    from oncotransfer.infer.external import evaluate_on
    same = evaluate_on(run_copy, "demo:osteosarcoma")["shift"]
    assert same["shifted"] is False and same["p_value"] > 0.01 and same["reference"]["images"] > 0
    other = evaluate_on(run_copy, _as_class_folder(tmp_path, sorted(demo_path("bus250").rglob("*.png"))[:40]))
    assert other["shift"]["shifted"] is True and other["shift"]["p_value"] < 0.01
    assert "dataset shift" in (run_copy / "report_external.md").read_text()


def test_adabn_scores_with_adapted_statistics_and_leaves_the_run_alone(run_copy, tmp_path):
    from oncotransfer.infer.external import evaluate_on
    data = _as_class_folder(tmp_path, TILES)
    plain = evaluate_on(run_copy, data)
    before = (run_copy / "checkpoint" / "model.safetensors").read_bytes()
    bn = evaluate_on(run_copy, data, adapt="bn")
    assert "AdaBN" in bn["scored_by"] and "AdaBN" not in plain["scored_by"]
    assert (run_copy / "checkpoint" / "model.safetensors").read_bytes() == before
    keys = ("scored", "flagged", "mean_score")  # OOD scores come from the models as trained; predictions do not
    assert [bn["ood"][k] for k in keys] == [plain["ood"][k] for k in keys]
    assert bn["pooled"]["confusion_matrix"] != plain["pooled"]["confusion_matrix"]
    with pytest.raises(ConfigError, match="--adapt 'xx'"):
        evaluate_on(run_copy, data, adapt="xx")
