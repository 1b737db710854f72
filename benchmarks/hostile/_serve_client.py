"""One hostile scenario against a real ``oncotransfer serve`` on 127.0.0.1 (used by service.py's cases).

Usage: python _serve_client.py RUN_DIR SCENARIO [serve options...]. Starts the server on a free loopback port,
waits for /health, runs SCENARIO while sampling the server's resident memory from /proc, kills the server and
prints "verdict: ok ..." (exit 0) or "verdict: fail ..." (exit 1), then the server's stderr tail.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from core import MEM_LIMIT, _rss as rss  # noqa: E402  (the harness's own memory reading)

MB = 2**20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(port: int, raw: bytes, timeout: float = 30) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        return read_answer(s)


def read_answer(s: socket.socket) -> bytes:
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
            if b"\r\n\r\n" in got and _complete(got):
                break
    except (socket.timeout, ConnectionResetError):
        pass
    return got


def _complete(got: bytes) -> bool:
    head, _, body = got.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def multipart_head(name: str = "a.png") -> bytes:
    return (b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="' + name.encode("utf-8", "replace")
            + b'"\r\nContent-Type: application/octet-stream\r\n\r\n')


def upload(port: int, total: int, chunked: bool, declared: int | None = None, name: str = "a.png") -> tuple[bytes, int]:
    """POST a body of ``total`` zero bytes (chunked, or with a Content-Length of ``declared``); stops sending once
    the server answers. Returns (answer, bytes sent)."""
    head = multipart_head(name)
    s = socket.create_connection(("127.0.0.1", port), timeout=60)
    start = (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=xyz\r\n"
             + (b"Transfer-Encoding: chunked\r\n" if chunked else b"Content-Length: %d\r\n" % (declared or total + len(head)))
             + b"\r\n")
    s.sendall(start + (b"%x\r\n%s\r\n" % (len(head), head) if chunked else head))
    block = b"\0" * (256 * 1024)
    piece = b"%x\r\n%s\r\n" % (len(block), block) if chunked else block
    sent, answer, pending = 0, b"", memoryview(b"")
    s.setblocking(False)
    try:
        while sent < total or pending:
            if not pending:
                pending = memoryview(piece)
                sent += len(block)
            try:
                pending = pending[s.send(pending):]
            except BlockingIOError:
                time.sleep(0.002)
            try:
                answer += s.recv(65536)
                if answer:
                    break
            except BlockingIOError:
                pass
    except (BrokenPipeError, ConnectionResetError):
        pass
    s.setblocking(True)
    s.settimeout(30)
    if not answer:
        if sent >= total and chunked:
            try:
                s.sendall(b"0\r\n\r\n")
            except OSError:
                pass
        answer = read_answer(s)
    s.close()
    return answer, sent


def scenario(name: str, port: int, pid: int) -> tuple[bool, str]:
    if name == "health":
        a = http(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return a.startswith(b"HTTP/1.1 200"), repr(a[:60])
    if name.startswith("chunked-") or name.startswith("declared-") or name.startswith("lying-"):
        mb = int(name.split("-")[1])
        t0 = time.monotonic()
        if name.startswith("lying-"):  # declares 1 KB, sends more: h11 refuses the extra bytes
            a, sent = upload(port, mb * MB, False, declared=1024)
            ok = a[:12] in (b"HTTP/1.1 400", b"HTTP/1.1 413", b"HTTP/1.1 415", b"HTTP/1.1 422") or a == b""
        else:
            a, sent = upload(port, mb * MB, name.startswith("chunked-"))
            ok = a.startswith(b"HTTP/1.1 413") and sent <= 40 * MB
        return ok, f"{a[:40]!r} after {sent / MB:.0f} MB sent, {time.monotonic() - t0:.1f} s"
    if name.startswith("concurrent-"):
        n = int(name.split("-")[1])
        with ThreadPoolExecutor(n) as ex:
            answers = list(ex.map(lambda _: upload(port, 400 * MB, True), range(n)))
        codes = sorted({a[:12].decode(errors="replace") for a, _ in answers})
        ok = all(a[:12] in (b"HTTP/1.1 413", b"HTTP/1.1 503") for a, _ in answers)
        return ok, f"{n} chunked 400 MB uploads: {codes}, {sum(s for _, s in answers) / MB:.0f} MB sent in all"
    if name == "escape-filename":
        a, _ = upload(port, 1000, False, name="x\x1b]0;pwned\x07.png")
        return a[:10] == b"HTTP/1.1 4" and b"\x1b" not in a, repr(a[:40])
    raise SystemExit(f"unknown scenario {name}")


def main() -> int:
    run, name, *opts = sys.argv[1:]
    port = free_port()
    log = open(os.path.join(os.getcwd(), f"serve_{name}.err"), "w+b")
    server = subprocess.Popen([sys.executable, "-m", "oncotransfer.cli", "serve", run, "--host", "127.0.0.1",
                               "--port", str(port), "--engine", "torch", "--log-file", os.devnull, *opts],
                              stdout=log, stderr=log, start_new_session=True)
    peak, stop = [0], threading.Event()

    def watch() -> None:
        while not stop.wait(0.02):
            peak[0] = max(peak[0], rss(server.pid))
            if peak[0] > MEM_LIMIT:
                os.killpg(server.pid, signal.SIGKILL)
                return
    threading.Thread(target=watch, daemon=True).start()
    ok, detail = False, "server did not come up in 90 s"
    try:
        for _ in range(900):
            if server.poll() is not None:
                detail = f"server exited ({server.returncode})"
                break
            try:
                if http(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 2).startswith(
                        b"HTTP/1.1 200"):
                    ok, detail = scenario(name, port, server.pid)
                    if server.poll() is not None:
                        ok, detail = False, f"server died during the scenario: {detail}"
                    break
            except OSError:
                time.sleep(0.1)
    finally:
        stop.set()
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.wait()
    if peak[0] > MEM_LIMIT:
        ok, detail = False, f"server resident memory {peak[0] / 2**30:.2f} GiB"
    log.seek(0)
    err = log.read().decode(errors="replace")
    if err.strip():
        print("server stderr:", err[-2000:])
    print(f"verdict: {'ok' if ok else 'fail'}: {detail}; server peak {peak[0] / MB:.0f} MB")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
