"""serve's options checked up front (one line each, never a traceback, a hang or an endless read), and uploads
without a Content-Length cut at the limit as they arrive."""
from __future__ import annotations

import math
import os
import socket
import threading
import time

import pytest

from oncotransfer.errors import ConfigError
from oncotransfer.serve.limits import ServeLimits
from oncotransfer.serve.middleware import open_log
from oncotransfer.serve.server import listen_socket, read_token


def _in_time(fn, seconds: float = 10):
    """``fn()``'s exception (or result); fails when it has not returned within ``seconds``."""
    out: list = []

    def go():
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out.append(e)
    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(seconds)
    assert out, f"still running after {seconds} s"
    return out[0]


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "dir", "huge", "binary", "two_lines"])
def test_token_file_is_read_as_one_bounded_line_of_a_regular_file(tmp_path, kind: str):
    f = tmp_path / "token"
    if kind == "dev_zero":
        f = "/dev/zero"
    elif kind == "fifo":
        os.mkfifo(f, 0o600)
    elif kind == "dir":
        f.mkdir()
    else:
        f.write_bytes({"huge": b"a" * 10_000_000, "binary": b"\xff\xfe" * 20,
                       "two_lines": b"first-token-0123456789\nsecond-token-0123456789\n"}[kind])
        f.chmod(0o600)
    e = _in_time(lambda: read_token(f))
    assert isinstance(e, ConfigError) and str(f) in str(e) and "\n" not in str(e)


@pytest.mark.parametrize("port", [-1, 0, 65536, 70000])
def test_port_out_of_range_is_one_line(port: int):
    with pytest.raises(ConfigError, match=f"--port {port}: expected a TCP port from 1 to 65535"):
        listen_socket("127.0.0.1", port)


def test_port_in_use_and_unknown_host_are_one_line():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match="already in use"):
            listen_socket("127.0.0.1", port)
    with pytest.raises(ConfigError, match="--host"):
        listen_socket("no-such-host.invalid", 8000)
    sock = listen_socket("127.0.0.1", port)  # free again: bound
    sock.close()


@pytest.mark.parametrize("kind", ["dir", "fifo", "missing_parent", "dev_full", "unwritable"])
def test_log_file_that_cannot_be_a_log_is_one_line_without_blocking(tmp_path, kind: str):
    target = {"dir": tmp_path, "fifo": tmp_path / "fifo", "missing_parent": tmp_path / "no" / "log.jsonl",
              "dev_full": "/dev/full", "unwritable": tmp_path / "ro" / "log.jsonl"}[kind]
    if kind == "fifo":
        os.mkfifo(target)
    if kind == "unwritable":
        if os.geteuid() == 0:
            pytest.skip("root may write anywhere")
        (tmp_path / "ro").mkdir(mode=0o500)
    e = _in_time(lambda: open_log(target))
    assert isinstance(e, ConfigError) and f"--log-file {target}" in str(e)


def test_log_file_regular_or_null_device_opens(tmp_path):
    for target in (tmp_path / "log.jsonl", os.devnull):
        with open_log(target) as f:
            f.write("{}\n")
    assert (tmp_path / "log.jsonl").read_text() == "{}\n"


@pytest.mark.parametrize("field,value", [("timeout_s", math.nan), ("max_decode_mb", math.inf),
                                         ("max_decode_mb", -5.0), ("body_timeout_s", 0.0),
                                         ("header_timeout_s", math.nan), ("max_queue", -1)])
def test_limits_that_are_not_finite_positive_numbers_are_one_line(field: str, value: float):
    with pytest.raises(ConfigError, match="expected a number"):
        ServeLimits(**{field: value})


@pytest.mark.parametrize("mb", [-1.0, 0.0, math.nan, math.inf])
def test_max_upload_is_checked_before_the_model_loads(tmp_path, mb: float):
    from oncotransfer.serve.app import create_app
    with pytest.raises(ConfigError, match="--max-upload-mb"):
        create_app(tmp_path / "no-run", max_upload_mb=mb)


def test_chunked_upload_is_cut_at_the_limit_without_reading_the_rest(tiny_run, live):
    """A 1 MB limit and a chunked body (no Content-Length) that would run to 200 MB: 413 long before the end."""
    from oncotransfer.serve.app import create_app
    limits = ServeLimits(body_timeout_s=30)
    app = create_app(tiny_run, engine="torch", max_upload_mb=1, limits=limits)
    with live(app, limits) as port, socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                  b"Content-Type: multipart/form-data; boundary=xyz\r\n\r\n")
        head = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        s.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        chunk = b"%x\r\n%s\r\n" % (1 << 16, b"\0" * (1 << 16))
        sent, t0 = 0, time.monotonic()
        s.settimeout(0.001)
        answer = b""
        try:
            while sent < 200 << 20 and time.monotonic() - t0 < 30:
                s.sendall(chunk)
                sent += 1 << 16
                try:
                    answer += s.recv(65536)
                except (socket.timeout, BlockingIOError):
                    continue
                if answer:
                    break
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass
        s.settimeout(10)
        try:
            while b"\r\n\r\n" not in answer and (more := s.recv(65536)):
                answer += more
        except (ConnectionResetError, socket.timeout):
            pass
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 20 << 20, f"{sent / 2**20:.0f} MB sent before the answer"
