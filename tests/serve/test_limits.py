"""The service on a network: bearer token, bounded queue (503 + Retry-After), time limit (504), pixel bombs
refused before decoding, request ids in a JSON access log without image bytes or file names, slow clients
closed. Real model (the tiny run) throughout; only the queue and time-limit tests slow its inference down."""
from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from oncotransfer.data.demo import demo_path
from oncotransfer.serve.limits import ServeLimits

IMG = sorted(demo_path("osteosarcoma").rglob("*.jpg"))[0]
TOKEN = "s3cret-token-0123456789abcdef"


def _app(run, **kw):
    from oncotransfer.serve.app import create_app
    return create_app(run, engine="torch", max_upload_mb=1, **kw)


def _post(client, name=IMG.name, data=None, **kw):
    return client.post("/predict", files={"file": (name, data or IMG.read_bytes(), "image/jpeg")}, **kw)


def _until(cond, what: str) -> None:
    for _ in range(400):
        if cond():
            return
        time.sleep(0.025)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def authed(tiny_run):
    return TestClient(_app(tiny_run, token=TOKEN), raise_server_exceptions=False)


def test_token_required_and_compared(authed):
    r = _post(authed)
    assert r.status_code == 401 and "Bearer" in r.headers["www-authenticate"] and "token" in r.json()["error"]
    assert _post(authed, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert _post(authed, headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    assert authed.get("/openapi.json").status_code == 401
    r = _post(authed, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and abs(sum(r.json()["probabilities"].values()) - 1) < 1e-5


def test_health_without_token_tells_readiness_only(authed):
    anon = authed.get("/health")
    assert anon.status_code == 200 and anon.json() == {"status": "ok", "ready": True, "auth_required": True}
    full = authed.get("/health", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert full["model"] == "tiny" and full["backbone"] == "efficientnet_lite0" and len(full["classes"]) == 3
    assert full["engine"] == "torch" and full["ready"] is True and full["load"]["max_concurrent"] >= 1
    assert authed.get("/").status_code == 200  # the page asks for the token itself


def test_token_file_is_checked(tmp_path):
    from oncotransfer.errors import ConfigError
    from oncotransfer.serve.server import read_token
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    f.chmod(0o600)
    assert read_token(f) == TOKEN
    f.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_token(f)
    f.write_text("short")
    f.chmod(0o600)
    with pytest.raises(ConfigError, match="at least 16"):
        read_token(f)
    with pytest.raises(ConfigError, match="cannot read"):
        read_token(tmp_path / "missing")


def test_pixel_bomb_refused_from_its_header(tiny_run, bomb_9000, monkeypatch):
    """79 KB of PNG declaring 9000 x 9000 px (81 MP: under Pillow's own limit) is refused with 413 and a
    one-line JSON error, and no pixel is decoded (ImageFile.load never runs)."""
    from PIL import ImageFile
    client = TestClient(_app(tiny_run), raise_server_exceptions=False)
    assert len(bomb_9000) < 100_000
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or real_load(self))
    r = _post(client, "bomb.png", bomb_9000)
    assert r.status_code == 413, r.text
    assert "9000 x 9000" in r.json()["error"] and "\n" not in r.text
    assert loads == []
    assert _post(client).status_code == 200 and loads  # a real image still decodes (the patch is live)
    assert client.app.state.gate.reserved == 0 and client.app.state.gate.admitted == 0


def test_request_id_echoed_and_logged_without_image_or_file_name(tiny_run, tmp_path):
    log = tmp_path / "access.jsonl"
    client = TestClient(_app(tiny_run, access_log=log), raise_server_exceptions=False)
    payload = IMG.read_bytes()
    r = _post(client, "patient_DOE_JOHN_19550101.jpg", payload, headers={"X-Request-ID": "req-42"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "req-42"
    r2 = client.get("/health", headers={"X-Request-ID": 'x"}\n{"forged": 1'})  # log injection: replaced
    assert r2.headers["x-request-id"] != 'x"}\n{"forged": 1' and len(r2.headers["x-request-id"]) == 32
    client.get("/patients/DOE_JOHN?mrn=12345")
    lines = log.read_text().splitlines()
    records = [json.loads(x) for x in lines]
    assert [(x["method"], x["path"], x["status"]) for x in records] == [
        ("POST", "/predict", 200), ("GET", "/health", 200), ("GET", "other", 404)]
    first = records[0]
    assert first["id"] == "req-42" and first["bytes_in"] > len(payload) and first["bytes_out"] > 0
    assert first["client"] and first["ms"] > 0 and records[1]["id"] == r2.headers["x-request-id"]
    text = log.read_text()
    assert "DOE" not in text and "12345" not in text and "forged" not in text
    assert payload[:64].hex() not in text and len(text) < 1000  # no image bytes, in any encoding


def _slow_predictor(app):
    """Inference held until ``release`` is set (the real model answers then)."""
    pred = app.state.predictor
    real = pred.predict_with_ood
    started, release = threading.Event(), threading.Event()

    def held(batch, *a, **kw):
        started.set()
        assert release.wait(30)
        return real(batch, *a, **kw)
    pred.predict_with_ood = held
    return started, release


def test_full_queue_answers_503_with_retry_after(tiny_run):
    app = _app(tiny_run, limits=ServeLimits(max_concurrent=1, max_queue=1))
    client = TestClient(app, raise_server_exceptions=False)
    gate = app.state.gate
    started, release = _slow_predictor(app)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(_post, client)
        assert started.wait(30)
        second = pool.submit(_post, client)  # waits for the one worker
        _until(lambda: gate.admitted == 2, "the second request to queue")
        r = _post(client)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and "busy" in r.json()["error"]
        assert client.get("/health").json()["ready"] is False
        release.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
    _until(lambda: gate.admitted == 0, "every place to be given back")
    assert client.get("/health").json()["ready"] is True


def test_time_limit_answers_504_and_the_work_keeps_its_place(tiny_run):
    app = _app(tiny_run, limits=ServeLimits(max_concurrent=1, max_queue=0, timeout_s=0.5))
    client = TestClient(app, raise_server_exceptions=False)
    gate = app.state.gate
    started, release = _slow_predictor(app)
    r = _post(client)
    assert r.status_code == 504 and "time limit" in r.json()["error"]
    assert started.is_set() and gate.admitted == 1  # still running: no new inference piles up behind it
    assert _post(client).status_code == 503
    release.set()
    _until(lambda: gate.admitted == 0, "the timed-out work to finish")
    assert _post(client).status_code == 200  # released: answers in time again


def _closed_within(sock: socket.socket, seconds: float) -> bytes:
    """Everything the server sends until it closes the connection; fails if it stays open ``seconds``."""
    sock.settimeout(seconds)
    got = b""
    try:
        while chunk := sock.recv(65536):
            got += chunk
    except socket.timeout:
        raise AssertionError(f"connection still open after {seconds} s; got {got[:200]!r}") from None
    return got


def test_slow_clients_are_closed(tiny_run, live):
    limits = ServeLimits(header_timeout_s=0.5, body_timeout_s=0.5, keep_alive_s=0.5)
    with live(_app(tiny_run, limits=limits), limits) as port:
        with socket.create_connection(("127.0.0.1", port)) as s:  # slowloris: headers never finish
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nX-a: ")
            assert _closed_within(s, 10) == b""
        with socket.create_connection(("127.0.0.1", port)) as s:  # says nothing at all
            assert _closed_within(s, 10) == b""
        with socket.create_connection(("127.0.0.1", port)) as s:  # body trickles, then stops
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                      b"boundary=xyz\r\nContent-Length: 100000\r\n\r\n--xyz\r\n")
            answer = _closed_within(s, 10)
            assert answer.startswith(b"HTTP/1.1 408") and b"x-request-id" in answer.lower()
        with socket.create_connection(("127.0.0.1", port)) as s:  # a proper client still gets its answer
            s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert _closed_within(s, 10).startswith(b"HTTP/1.1 200")  # then closed when idle (keep-alive)


def test_a_crash_inside_inference_is_one_json_500_and_the_service_stays_up(tiny_run):
    app = _app(tiny_run)
    client = TestClient(app, raise_server_exceptions=False)
    pred = app.state.predictor
    real = pred.predict_with_ood
    pred.predict_with_ood = lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("engine fell over"))
    r = _post(client, headers={"X-Request-ID": "crash-1"})
    assert r.status_code == 500 and r.json()["error"] == "internal error: RuntimeError (request id crash-1)"
    assert r.headers["x-request-id"] == "crash-1"
    pred.predict_with_ood = real
    assert _post(client).status_code == 200 and app.state.gate.admitted == 0
