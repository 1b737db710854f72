"""Predict, TTA, Grad-CAM and export on a real tiny run and the real demo tiles."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from oncotransfer.data.demo import demo_path

DEMO = demo_path("osteosarcoma")


def _demo_images(n: int) -> list[Path]:
    return sorted(DEMO.rglob("*.jpg"))[:n]


@pytest.fixture(scope="module")
def predictor(tiny_run):
    from oncotransfer.infer.predict import Predictor
    return Predictor.from_run(tiny_run, engine="torch")


def test_predict_csv_on_demo_images(tiny_run, tmp_path):
    from oncotransfer.infer.predict import run_predict
    folder = tmp_path / "in" / "nested"
    folder.mkdir(parents=True)
    for p in _demo_images(3):
        shutil.copy(p, folder / p.name)
    (folder / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "preds.csv"
    df, errors = run_predict(tiny_run, [str(tmp_path / "in")], out, engine="torch")
    csv = pd.read_csv(out)
    classes = json.loads((tiny_run / "checkpoint" / "meta.json").read_text())["classes"]
    assert list(csv.columns) == ["path", "pred"] + [f"prob_{c}" for c in classes] + ["ood_score", "in_distribution"]
    assert len(csv) == 3 and set(csv["pred"]) <= set(classes)
    probs = csv[[f"prob_{c}" for c in classes]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert (csv["pred"] == [classes[k] for k in probs.argmax(1)]).all()
    assert list(errors) == [str(folder / "broken.jpg")] and "not an image" in errors[str(folder / "broken.jpg")]


def test_predict_matches_training_predictions(tiny_run, predictor):
    """Same preprocessing as training: the run's own test predictions are reproduced."""
    from oncotransfer.data.manifest import resolve_data_path
    saved = pd.read_csv(tiny_run / "predictions.csv")
    root = resolve_data_path("demo:osteosarcoma")
    df, errors = predictor.predict_paths([root / p for p in saved["path"]])
    assert not errors
    cols = [c for c in saved.columns if c.startswith("prob_")]
    # training ran the backbone channels_last on cached features: float rounding only
    np.testing.assert_allclose(df[cols].to_numpy(), saved[cols].to_numpy(), atol=1e-3)


def test_predict_images_accepts_pil_and_tensors(predictor):
    img = Image.open(_demo_images(1)[0])
    t = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()
    a, b = predictor.predict_images([img]), predictor.predict_images([t])
    assert a.shape == (1, len(predictor.classes))
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_tta_averages_flips_and_rotations(predictor):
    imgs = [Image.open(p) for p in _demo_images(2)]
    batch = predictor.to_uint8(imgs)
    predictor.rotation = 0.0
    assert len(predictor.tta_views(batch)) == 3
    views = predictor.tta_views(batch)
    assert torch.equal(views[1], batch.flip(-1)) and torch.equal(views[2], batch.flip(-2))
    expected = np.mean([predictor.predict_uint8(v) for v in views], axis=0)
    np.testing.assert_allclose(predictor.predict_images(imgs, tta=True), expected, atol=1e-6)
    predictor.rotation = 90.0  # +-90 degrees are exact pixel permutations: checks the rotation direction too
    try:
        views = predictor.tta_views(batch)
    finally:
        predictor.rotation = 0.0
    assert len(views) == 5
    assert torch.equal(views[3], torch.rot90(batch, k=-1, dims=(-2, -1)))
    assert torch.equal(views[4], torch.rot90(batch, k=1, dims=(-2, -1)))


def test_missing_paths_are_errors_not_crashes(predictor, tmp_path):
    df, errors = predictor.predict_paths([tmp_path / "absent.png"])
    assert len(df) == 0 and "no such file" in errors[str(tmp_path / "absent.png")]


def test_a_batch_whose_every_file_is_unreadable_is_errors_and_the_next_batch_is_scored(predictor, tmp_path):
    from oncotransfer.data.demo import demo_path
    bad = [tmp_path / "a.png", tmp_path / "b.png"]  # files, but not what their names say
    for p in bad:
        p.write_text("not an image")
    good = sorted(demo_path("osteosarcoma").rglob("*.jpg"))[0]
    df, errors = predictor.predict_paths([*bad, good], batch_size=2)
    assert set(errors) == {str(p) for p in bad} and list(df["path"]) == [str(good)]


def test_predictions_on_labelled_data(tiny_run):
    from oncotransfer.infer.external import predictions_on
    df = predictions_on(tiny_run, "demo:osteosarcoma", engine="torch")
    saved = pd.read_csv(tiny_run / "predictions.csv")
    assert list(df.columns) == list(saved.columns)
    assert len(df) == 60 and (df["fold"] == 0).all()


def test_gradcam_heatmap_shape_and_range(predictor):
    from oncotransfer.infer.explain import heatmap, overlay_png
    img = Image.open(_demo_images(1)[0]).convert("RGB")
    x = predictor.normalised(predictor.to_uint8([img]))
    flags = [p.requires_grad for p in predictor.model.parameters()]
    heat = heatmap(predictor.model, x)
    assert heat.shape == (predictor.size, predictor.size)
    assert heat.min() >= 0 and heat.max() <= 1 and heat.max() > 0.5 and np.isfinite(heat).all()
    assert [p.requires_grad for p in predictor.model.parameters()] == flags  # frozen base restored
    png = overlay_png(img, heat)
    over = Image.open(__import__("io").BytesIO(png))
    assert over.format == "PNG" and over.size == img.size


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_parity_and_description(tiny_run, fmt, capsys):
    from oncotransfer.infer.export import export_run
    lines: list[str] = []
    path = export_run(tiny_run, fmt, log=lines.append)
    info = json.loads((path.parent / "model.json").read_text())
    meta = json.loads((tiny_run / "checkpoint" / "meta.json").read_text())
    assert path.is_file() and info["classes"] == meta["classes"]
    assert info["preprocessing"]["size"] == 128 and info["preprocessing"]["mean"] == meta["preprocessing"]["mean"]
    assert info["parity"]["max_abs_diff"] <= 1e-4 and info["parity"]["images"] > 0
    assert "max abs probability difference" in lines[0]


def test_onnx_engine_agrees_with_torch(tiny_run, predictor):
    from oncotransfer.infer.export import export_run
    from oncotransfer.infer.predict import Predictor
    export_run(tiny_run, "onnx")
    ort = Predictor.from_run(tiny_run)  # auto picks the export
    assert ort.engine == "onnx"
    imgs = [Image.open(p) for p in _demo_images(4)]
    np.testing.assert_allclose(ort.predict_images(imgs), predictor.predict_images(imgs), atol=1e-4)


def test_onnx_engine_without_export_exports_first(tmp_path, tiny_run):
    from oncotransfer.infer.predict import Predictor
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "checkpoint", run / "checkpoint")
    lines: list[str] = []
    assert Predictor.from_run(run, engine="onnx", log=lines.append).engine == "onnx"
    assert lines == [f"exporting the model to {run / 'export' / 'model.onnx'} for ONNX Runtime (not exported yet)"]


def test_export_fails_when_parity_breaks(tiny_run, monkeypatch):
    import oncotransfer.runtime as onnx_mod
    from oncotransfer.infer.export import ExportParityError, export_run
    real = onnx_mod.run_session_outputs
    for k in (0, 1):  # the probabilities, then the out-of-distribution score
        monkeypatch.setattr(onnx_mod, "run_session_outputs",
                            lambda s, x, batch_size=32, k=k: [o + 1e-3 * (i == k) for i, o in enumerate(real(s, x, batch_size))])
        with pytest.raises(ExportParityError, match="differ from PyTorch"):
            export_run(tiny_run, "onnx")
        assert not (tiny_run / "export" / "model.onnx").exists()  # never left for predict/serve to pick up
