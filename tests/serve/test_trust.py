"""When not to trust an answer: /predict's out-of-distribution score and verdict and ``refer``, on both engines
(a 3-fold run whose folds have validation images, so its detector has a threshold)."""
from __future__ import annotations

import io
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from oncotransfer.data.demo import demo_path

TILE = sorted(demo_path("osteosarcoma").rglob("*.jpg"))[5]
ULTRASOUND = demo_path("bus250") / "benign" / "us10.png"  # breast ultrasound: not what an osteosarcoma model saw


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


NOISE = _png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)))
GREY = _png(Image.new("RGB", (128, 128), (128, 128, 128)))
OOD = {"ultrasound": ULTRASOUND.read_bytes(), "noise": NOISE, "flat grey": GREY}


@pytest.fixture(scope="module")
def exported(kfold_run, tmp_path_factory) -> Path:
    from oncotransfer.infer.export import export_run
    run = tmp_path_factory.mktemp("trust") / "run"
    shutil.copytree(kfold_run[0], run)
    export_run(run, "onnx")
    return run


@pytest.fixture(scope="module")
def clients(exported):
    from oncotransfer.serve.app import create_app
    return {e: TestClient(create_app(exported, engine=e), raise_server_exceptions=False) for e in ("torch", "onnx")}


def _post(client, data: bytes, name: str = "x.png", query: str = "") -> dict:
    r = client.post("/predict" + query, files={"file": (name, data, "image/png")})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_health_reports_the_detector_and_the_confidence_cut(clients, engine):
    h = clients[engine].get("/health").json()
    assert h["engine"] == engine
    ood = h["ood"]
    assert ood["detector"] == "knn" and ood["pass_rate"] == 0.95 and 0 < ood["threshold"] < 2  # knn on unit vectors
    assert h["coverage"] == 0.9 and 0 < h["confidence_cut"] < 1


@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_osteosarcoma_tile_is_in_distribution_and_other_images_are_referred(clients, engine):
    client = clients[engine]
    h = client.get("/health").json()
    tile = _post(client, TILE.read_bytes(), TILE.name)
    assert tile["in_distribution"] is True and tile["ood_score"] <= h["ood"]["threshold"] == tile["ood_threshold"]
    top = max(tile["probabilities"].values())
    assert tile["refer"] == (top < h["confidence_cut"])
    assert tile["refer_reason"] == ("" if not tile["refer"] else f"low confidence (< {h['confidence_cut']:.3f})")
    assert tile["blank"] is None
    for what, data in OOD.items():
        body = _post(client, data)
        assert body["in_distribution"] is False, what
        assert body["ood_score"] > body["ood_threshold"] == h["ood"]["threshold"], what
        assert body["refer"] is True and body["refer_reason"].startswith("out of distribution"), what
        assert abs(sum(body["probabilities"].values()) - 1) < 1e-5  # the guess is still given, flagged
        assert (body["blank"] is not None) == (what == "flat grey"), what
    grey = _post(client, GREY)
    assert grey["blank"] == "constant image (every pixel = 128)"
    assert grey["refer_reason"].endswith("; blank input: constant image (every pixel = 128)")


def test_onnx_pool_workers_give_the_same_ood_scores_as_pytorch(clients):
    """Each pooled worker is a copy of the predictor with its own single-threaded session: every one must read
    the export's second output, under concurrent requests."""
    pool = clients["onnx"].app.state.engines
    workers = list(pool.queue)
    assert len(workers) == pool.maxsize
    for w in workers:
        assert w.session is not clients["onnx"].app.state.predictor.session
        assert [o.name for o in w.session.get_outputs()] == ["output", "ood_score"]
    uploads = [TILE.read_bytes(), *OOD.values()] * 2
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda d: _post(clients["onnx"], d), uploads))
    want = [_post(clients["torch"], d) for d in uploads]
    for g, w in zip(got, want):
        assert g["engine"] == "onnx" and w["engine"] == "torch"
        assert g["ood_score"] == pytest.approx(w["ood_score"], rel=1e-4)
        assert g["in_distribution"] == w["in_distribution"] and g["refer"] == w["refer"]
    assert pool.qsize() == pool.maxsize


def test_explain_path_under_the_lock_gives_the_ood_score_too(clients):
    plain = _post(clients["onnx"], NOISE)
    explained = _post(clients["onnx"], NOISE, query="?explain=true")
    assert explained["overlay_png"] and explained["ood_score"] == pytest.approx(plain["ood_score"], rel=1e-5)
    assert explained["in_distribution"] is False


def test_coverage_zero_refers_a_confident_in_distribution_tile_for_low_confidence(exported):
    """coverage 0 answers no validation image: the cut is the most confident one's top probability."""
    from oncotransfer.errors import ConfigError
    from oncotransfer.serve.app import create_app
    client = TestClient(create_app(exported, engine="torch", coverage=0.0))
    h = client.get("/health").json()
    assert h["coverage"] == 0.0 and h["confidence_cut"] > 0.9
    body = _post(client, TILE.read_bytes(), TILE.name)
    assert body["in_distribution"] is True and max(body["probabilities"].values()) < h["confidence_cut"]
    assert body["refer"] is True and body["refer_reason"] == f"low confidence (< {h['confidence_cut']:.3f})"
    with pytest.raises(ConfigError, match="coverage 1.5"):
        create_app(exported, engine="torch", coverage=1.5)


def test_run_without_threshold_gives_a_score_but_no_verdict(tiny_run):
    """A holdout run has no validation subset of its own, so no threshold: the score, never a flag."""
    from oncotransfer.serve.app import create_app
    client = TestClient(create_app(tiny_run, engine="torch"))
    assert client.get("/health").json()["ood"]["threshold"] is None
    body = _post(client, NOISE)
    assert isinstance(body["ood_score"], float)
    assert body["in_distribution"] is None and body["ood_threshold"] is None
    assert body["refer"] is False and body["refer_reason"] == ""
    blank = _post(client, GREY)  # no detector, no cut: a blank upload is still referred, and says why
    assert blank["refer"] is True and blank["refer_reason"] == "blank input: constant image (every pixel = 128)"
