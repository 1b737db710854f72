"""Scoring engines: ONNX Runtime by default (the run exported on first use, again when stale, once when started
at once), PyTorch with one line where that is impossible; and predict's decode-while-scoring pipeline."""
from __future__ import annotations

import errno
import json
import shutil
import threading

import numpy as np
import pytest

from oncotransfer.data.demo import demo_path
from oncotransfer.errors import CheckpointError
from oncotransfer.io import sha256_file

IMAGES = sorted(demo_path("osteosarcoma").rglob("*.jpg"))[:7]


def _stamp(path):
    return path.stat().st_mtime_ns, sha256_file(path)


def test_auto_exports_on_first_use_and_reuses_it(run_copy):
    from oncotransfer.infer.predict import Predictor
    lines: list[str] = []
    first = Predictor.from_run(run_copy, log=lines.append)
    onnx = run_copy / "export" / "model.onnx"
    assert first.engine == "onnx" and first.onnx_path == onnx
    assert len(lines) == 1 and "exporting the 3 fold models" in lines[0] and "not exported yet" in lines[0]
    before = _stamp(onnx), _stamp(run_copy / "export" / "model.json")
    again: list[str] = []
    second = Predictor.from_run(run_copy, log=again.append)
    assert second.engine == "onnx" and again == []  # no second export: same bytes, same mtime
    assert (_stamp(onnx), _stamp(run_copy / "export" / "model.json")) == before
    # the probabilities (and OOD scores) of both engines agree on the same images
    from PIL import Image
    images = [Image.open(p) for p in IMAGES]
    torch_pred = Predictor.from_run(run_copy, "torch")
    (p1, o1), (p2, o2) = (pr.predict_with_ood(pr.to_uint8(images)) for pr in (torch_pred, second))
    np.testing.assert_allclose(p2, p1, atol=1e-4)
    np.testing.assert_allclose(o2, o1, atol=1e-4, rtol=1e-4)
    # predict's path, with test-time augmentation, on both engines
    (t1, _), (t2, _) = (pr.predict_paths([str(p) for p in IMAGES], tta=True) for pr in (torch_pred, second))
    cols = [c for c in t1.columns if c.startswith("prob_") or c == "ood_score"]
    np.testing.assert_allclose(t2[cols].to_numpy(float), t1[cols].to_numpy(float), atol=1e-4, rtol=1e-4)


def test_a_stale_export_is_made_again(run_copy):
    """Fold files retrained in place (meta.json's digests and temperatures change, model.safetensors does not)."""
    from oncotransfer.infer.predict import Predictor
    Predictor.from_run(run_copy)
    meta_path = run_copy / "checkpoint" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["folds"][1]["temperature"] = 1.2345
    meta_path.write_text(json.dumps(meta))
    lines: list[str] = []
    pred = Predictor.from_run(run_copy, log=lines.append)
    assert pred.engine == "onnx" and len(lines) == 1 and "temperatures are not the run's" in lines[0]
    info = json.loads((run_copy / "export" / "model.json").read_text())
    assert info["members"][1]["temperature"] == 1.2345
    assert info["source"]["meta_sha256"] == sha256_file(meta_path)
    # a change that leaves the members as they were (a fold file swapped for a retrained one) is seen too
    meta["folds"][2]["note"] = "retrained"
    meta_path.write_text(json.dumps(meta))
    lines.clear()
    assert Predictor.from_run(run_copy, log=lines.append).engine == "onnx"
    assert len(lines) == 1 and "fold models changed" in lines[0]


def test_a_damaged_export_is_replaced_not_loaded(run_copy):
    from oncotransfer.infer.predict import Predictor
    Predictor.from_run(run_copy)
    onnx = run_copy / "export" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:1000])
    lines: list[str] = []
    assert Predictor.from_run(run_copy, "onnx", log=lines.append).engine == "onnx"
    assert "damaged" in lines[0] and onnx.stat().st_size > 1000


def test_read_only_run_or_missing_onnxruntime_falls_back_to_torch_in_one_line(run_copy, monkeypatch):
    from oncotransfer.infer import export_cache, predict
    from oncotransfer.infer.predict import Predictor

    def read_only(path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))
    monkeypatch.setattr(export_cache, "_locked", read_only)
    lines: list[str] = []
    assert Predictor.from_run(run_copy, log=lines.append).engine == "torch"
    assert lines == [f"note: scoring with PyTorch, not ONNX Runtime: cannot write {run_copy / 'export' / '.export.lock'}"
                     " (Read-only file system)"]
    with pytest.raises(CheckpointError, match=r"^--engine onnx: .*Read-only file system\); use --engine torch$"):
        Predictor.from_run(run_copy, "onnx")
    monkeypatch.undo()
    monkeypatch.setattr(predict, "onnx_available", lambda: False)
    lines.clear()
    assert Predictor.from_run(run_copy, log=lines.append).engine == "torch"
    assert lines == ["note: scoring with PyTorch, not ONNX Runtime: onnxruntime is not installed "
                     "(pip install onnxruntime)"]
    assert not (run_copy / "export" / "model.onnx").exists()


def test_engine_onnx_on_a_model_that_does_not_export_is_one_error_line(run_copy, monkeypatch, capsys):
    from oncotransfer import cli
    from oncotransfer.infer import export

    def broken(*a, **kw):
        raise RuntimeError("Exporting the operator 'aten::weird' to ONNX opset version 17 is not supported\nmore")
    monkeypatch.setattr(export, "export_run", broken)
    monkeypatch.setattr("sys.argv", ["oncotransfer", "predict", str(run_copy), str(IMAGES[0]), "--engine", "onnx",
                                     "--out", str(run_copy / "p.csv")])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 2 and err[0].startswith("exporting")
    assert err[1].startswith("error: --engine onnx: ") and "does not export (Exporting the operator" in err[1]
    # auto: the same run scores with PyTorch, saying why once
    monkeypatch.setattr("sys.argv", ["oncotransfer", "predict", str(run_copy), str(IMAGES[0]),
                                     "--out", str(run_copy / "p.csv")])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 0 and (run_copy / "p.csv").is_file()
    assert err.count("note: scoring with PyTorch, not ONNX Runtime: the model does not export") == 1


def test_fold_k_is_exported_beside_the_ensemble(run_copy):
    from oncotransfer.infer.predict import Predictor
    ens = Predictor.from_run(run_copy)
    stamp = _stamp(run_copy / "export" / "model.onnx")
    one = Predictor.from_run(run_copy, fold=1)
    assert one.engine == "onnx" and one.onnx_path == run_copy / "export" / "fold1" / "model.onnx"
    assert json.loads((run_copy / "export" / "fold1" / "model.json").read_text())["members"][0]["fold"] == 1
    assert _stamp(run_copy / "export" / "model.onnx") == stamp and ens.engine == "onnx"
    from PIL import Image
    images = [Image.open(p) for p in IMAGES]
    np.testing.assert_allclose(one.predict_images(images),
                               Predictor.from_run(run_copy, "torch", fold=1).predict_images(images), atol=1e-4)


def test_processes_starting_at_once_export_once(run_copy, monkeypatch):
    """The export is made under a lock: the second waits, then finds it current."""
    from oncotransfer.infer import export
    from oncotransfer.infer.predict import Predictor
    real, calls = export.export_run, []
    monkeypatch.setattr(export, "export_run", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    preds: list = []
    threads = [threading.Thread(target=lambda: preds.append(Predictor.from_run(run_copy))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and [p.engine for p in preds] == ["onnx", "onnx"]


def test_pipeline_keeps_input_order_values_and_error_lines(kfold_run, tmp_path):
    from oncotransfer.data.images import decode_for_model
    from oncotransfer.data.readers import ImageReadError
    from oncotransfer.infer.predict import Predictor
    pred = Predictor.from_run(kfold_run[0], "torch")
    bad = tmp_path / "b_cut.jpg"
    bad.write_bytes(IMAGES[0].read_bytes()[:300])
    files = [str(p) for p in IMAGES[:3]] + [str(bad)] + [str(p) for p in IMAGES[3:]]
    streamed, errors = pred.predict_paths(files, batch_size=2)  # 4 batches, one holding the bad file
    whole, errors_whole = pred.predict_paths(files, batch_size=len(files))
    assert streamed["path"].tolist() == whole["path"].tolist() == [str(p) for p in IMAGES]
    assert streamed["pred"].tolist() == whole["pred"].tolist() and errors == errors_whole
    # batches of 2 against one of 7: the same values up to the engine's batch-size rounding
    np.testing.assert_allclose(streamed.filter(like="prob_").to_numpy(float),
                               whole.filter(like="prob_").to_numpy(float), atol=1e-6)
    np.testing.assert_allclose(streamed["ood_score"], whole["ood_score"], rtol=1e-5)
    with pytest.raises(ImageReadError) as e:
        decode_for_model(bad, pred.size)
    assert errors == {str(bad): str(e.value)}
    # each image alone gives the same probabilities as in its batch
    for i, p in enumerate(IMAGES):
        one, _ = pred.predict_paths([str(p)])
        np.testing.assert_allclose(one.filter(like="prob_").to_numpy(float),
                                   streamed.filter(like="prob_").to_numpy(float)[i:i + 1], atol=1e-6)


def test_serve_defaults_to_the_exported_ensemble(run_copy):
    from fastapi.testclient import TestClient

    from oncotransfer.serve.app import create_app
    lines: list[str] = []
    client = TestClient(create_app(run_copy, log=lines.append))
    assert client.get("/health").json()["engine"] == "onnx" and len(lines) == 1
    r = client.post("/predict", files={"file": (IMAGES[0].name, IMAGES[0].read_bytes(), "image/jpeg")}).json()
    want = TestClient(create_app(run_copy, engine="torch")).post(
        "/predict", files={"file": (IMAGES[0].name, IMAGES[0].read_bytes(), "image/jpeg")}).json()
    assert r["engine"] == "onnx" and r["probabilities"] == pytest.approx(want["probabilities"], abs=1e-4)
    assert r["ood_score"] == pytest.approx(want["ood_score"], rel=1e-4, abs=1e-4)


def test_evaluate_data_scores_with_its_own_export_like_torch(run_copy):
    """``evaluate --data`` reads uncalibrated and calibrated probabilities, OOD scores and the first member's
    features: RUN/export/scoring gives them all from one ONNX Runtime pass, equal to PyTorch's."""
    from oncotransfer.infer.external import predictions_on
    lines: list[str] = []
    onnx = predictions_on(run_copy, "demo:osteosarcoma", log=lines.append)
    assert len(lines) == 1 and str(run_copy / "export" / "scoring" / "model.onnx") in lines[0]
    torch_df = predictions_on(run_copy, "demo:osteosarcoma", engine="torch")
    assert onnx["path"].tolist() == torch_df["path"].tolist()
    cols = [c for c in torch_df.columns if c.startswith(("prob_", "cal_prob_"))]
    assert any(c.startswith("cal_prob_") for c in cols)
    np.testing.assert_allclose(onnx[cols].to_numpy(float), torch_df[cols].to_numpy(float), atol=1e-4)
    np.testing.assert_allclose(onnx["ood_score"], torch_df["ood_score"], rtol=1e-4, atol=1e-4)
    assert onnx.attrs["features"].shape == torch_df.attrs["features"].shape
    np.testing.assert_allclose(onnx.attrs["features"], torch_df.attrs["features"], rtol=1e-4, atol=1e-4)
    lines.clear()
    predictions_on(run_copy, "demo:osteosarcoma", log=lines.append)
    assert lines == []  # reused
