"""Helpers for the service tests: a decompression-bomb PNG made without holding its pixels, a live server."""
from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
import zlib

import pytest


def png_bomb(width: int, height: int) -> bytes:
    """A valid greyscale PNG of width x height zero pixels, compressed row by row (9000 x 9000: ~79 KB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    z = zlib.compressobj(9)
    rows = b"\0" * (width + 1) * 64  # 64 rows of filter byte + pixels at a time
    idat = b"".join(z.compress(rows) for _ in range(height // 64))
    idat += z.compress(b"\0" * (width + 1) * (height % 64)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def bomb_9000() -> bytes:
    return png_bomb(9000, 9000)


@pytest.fixture
def live():
    return live_server


@contextlib.contextmanager
def live_server(app, limits):
    """The app under the service's own uvicorn set-up on 127.0.0.1 and an ephemeral port; yields the port."""
    import uvicorn
    from oncotransfer.serve.server import uvicorn_config
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port, limits))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
