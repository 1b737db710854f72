"""The service: happy path and each hostile request, via FastAPI's TestClient (real model, real images)."""
from __future__ import annotations

import base64
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from oncotransfer.data.demo import demo_path

IMG = sorted(demo_path("osteosarcoma").rglob("*.jpg"))[0]


@pytest.fixture(scope="module")
def client(tiny_run):
    from oncotransfer.serve.app import create_app
    return TestClient(create_app(tiny_run, engine="torch", max_upload_mb=1), raise_server_exceptions=False)


def _healthy(client) -> None:
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_health(client):
    h = client.get("/health").json()
    assert h["model"] == "tiny" and len(h["classes"]) == 3


def test_predict_happy_path_with_explanation(client):
    r = client.post("/predict?explain=true", files={"file": (IMG.name, IMG.read_bytes(), "image/jpeg")})
    assert r.status_code == 200
    body = r.json()
    assert set(body["probabilities"]) == set(body["classes"])
    assert abs(sum(body["probabilities"].values()) - 1) < 1e-5
    assert body["predicted"] == max(body["probabilities"], key=body["probabilities"].get)
    assert body["model"] == "tiny" and body["version"]
    overlay = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))
    assert overlay.format == "PNG" and overlay.size == Image.open(IMG).size


def test_predict_without_explain_has_no_overlay(client):
    r = client.post("/predict", files={"file": (IMG.name, IMG.read_bytes(), "image/jpeg")})
    assert r.status_code == 200 and r.json()["overlay_png"] is None


def _slide() -> bytes:
    """A small pyramidal TIFF: a whole slide, whose full level Pillow would otherwise score as one picture."""
    import numpy as np
    import tifffile
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tif:
        for side in (512, 256):
            tif.write(np.full((side, side, 3), 200, np.uint8), tile=(128, 128), photometric="rgb",
                      subfiletype=0 if side == 512 else 1)  # reduced-resolution level
    return buf.getvalue()


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@pytest.mark.parametrize("case, files, status, words", [
    ("text", {"file": ("a.jpg", b"not an image at all", "image/jpeg")}, 415, "not an image"),
    ("truncated", {"file": ("t.jpg", IMG.read_bytes()[:3000], "image/jpeg")}, 400, "truncated"),
    ("empty", {"file": ("e.jpg", b"", "image/jpeg")}, 400, "empty"),
    ("bomb", {"file": ("b.png", _bomb(), "image/png")}, 413, "too large"),
    ("too big", {"file": ("big.bin", b"\0" * (2 * 2**20), "application/octet-stream")}, 413, "limit"),
    ("whole slide", {"file": ("s.tif", _slide(), "image/tiff")}, 415, "slides tile"),
    ("wrong field", {"image": (IMG.name, IMG.read_bytes(), "image/jpeg")}, 422, "'file'"),
])
def test_bad_requests_get_clear_4xx_and_service_stays_up(client, case, files, status, words):
    r = client.post("/predict", files=files)
    assert r.status_code == status, (case, r.text)
    assert words in r.json()["error"]
    _healthy(client)


def test_upload_over_limit_without_content_length_is_refused_by_read_size(client):
    def chunks():  # chunked transfer: no Content-Length, so only the read-size check can catch it
        boundary = b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b.bin\"\r\n\r\n"
        yield boundary
        for _ in range(3):
            yield b"\0" * 2**20
        yield b"\r\n--xyz--\r\n"
    r = client.post("/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 413
    _healthy(client)


def test_index_page_is_served_offline(client):
    r = client.get("/")
    assert r.status_code == 200 and "predict?explain=true" in r.text
    assert "http://" not in r.text and "https://" not in r.text  # no CDN: the machine is offline


def test_onnx_session_pool_answers_concurrent_requests_like_torch(tiny_run, tmp_path):
    """With an ONNX export each request takes one of the pooled single-threaded sessions: 8 concurrent
    requests all succeed, every pooled session is returned, and the answers match the PyTorch engine."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    from oncotransfer.infer.export import export_run
    from oncotransfer.serve.app import create_app
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    export_run(run, "onnx")
    images = sorted(demo_path("osteosarcoma").rglob("*.jpg"))[:8]
    onnx_client = TestClient(create_app(run, engine="onnx"), raise_server_exceptions=False)
    torch_client = TestClient(create_app(run, engine="torch"), raise_server_exceptions=False)

    def post(c, p):
        return c.post("/predict", files={"file": (p.name, p.read_bytes(), "image/jpeg")})
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda p: post(onnx_client, p), images))
    assert [r.status_code for r in got] == [200] * len(images)
    assert all(r.json()["engine"] == "onnx" for r in got)
    for p, r in zip(images, got):
        want = post(torch_client, p).json()["probabilities"]
        assert r.json()["probabilities"] == pytest.approx(want, abs=1e-4)
    pool = onnx_client.app.state.engines
    assert pool is not None and pool.qsize() == pool.maxsize  # every session went back
