"""uvicorn, set up for a network: slow clients closed, header size bounded, connections capped.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) and bounds a request head to 16 KB
(``h11_max_incomplete_event_size``), but a client that trickles its headers (slowloris) is never timed out
there; ``_HeaderTimeoutProtocol`` closes a connection whose request head has not arrived within
``header_timeout_s`` of the connection or of the previous response. Slow bodies are cut off by the
middleware's body deadline (408, connection closed).
"""
from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

from uvicorn.protocols.http.h11_impl import H11Protocol

from oncotransfer.errors import ConfigError
from oncotransfer.serve.limits import ServeLimits


class _HeaderTimeoutProtocol(H11Protocol):
    header_timeout_s = 10.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._head_timer = None
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_expired(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self.transport.close()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request head was parsed: the app has it now
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()  # before super(): it may parse a pipelined request, which disarms again
        super().on_response_complete()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


def protocol_class(header_timeout_s: float) -> type:
    return type("HeaderTimeoutProtocol", (_HeaderTimeoutProtocol,), {"header_timeout_s": header_timeout_s})


def uvicorn_config(app, host: str, port: int, limits: ServeLimits, **kw):
    import uvicorn
    gate = app.state.gate
    return uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False,  # ours is the JSON access log
        http=protocol_class(limits.header_timeout_s), timeout_keep_alive=limits.keep_alive_s,
        h11_max_incomplete_event_size=16 * 1024,
        limit_concurrency=connection_cap(gate.capacity), **kw)


def connection_cap(capacity: int) -> int:
    """Open connections uvicorn allows (beyond: its own plain 503, without Retry-After and outside our log).
    Only a guard against connection floods: far above the /predict queue (measured: a cap of 72 was reached
    at 100 req/s of one-connection-per-request clients), and within half the process's file descriptors."""
    cap = max(512, 16 * capacity)
    try:
        import resource
    except ImportError:  # not on Windows
        return cap
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return cap if soft == resource.RLIM_INFINITY else max(64, min(cap, soft // 2))


MAX_TOKEN_FILE = 4096  # bytes: a token is one short line; more is the wrong file (or /dev/zero)


def read_token(path: Path) -> str:
    """The bearer token: the file's one line, stripped. A missing, empty, over-long or not regular file (a FIFO,
    a device: never read, so never a hang or an endless read) is a one-line error; a file others may read is
    refused."""
    fix = "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))' > token.txt; chmod 600 token.txt)"
    try:  # O_NONBLOCK: opening a FIFO must not wait for a writer
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise ConfigError(f"--token-file {path}: cannot read it ({e.strerror}); give a file holding the token "
                          f"{fix}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"--token-file {path} is not a regular file; give a file holding the token {fix}")
        data = os.read(fd, MAX_TOKEN_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_TOKEN_FILE:
        raise ConfigError(f"--token-file {path} is over {MAX_TOKEN_FILE} bytes: expected one line holding the token "
                          f"{fix}")
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"--token-file {path} is not UTF-8 text: expected one line holding the token {fix}") from None
    if len(token) < 16 or any(c.isspace() or not c.isprintable() for c in token):
        raise ConfigError(f"--token-file {path}: expected one token of at least 16 characters without spaces {fix}")
    if os.name == "posix" and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"--token-file {path}: other users may read it; chmod 600 {path}")
    return token


def listen_socket(host: str, port: int) -> socket.socket:
    """The service's socket, bound now (before the model loads): a bad port, a port in use or a host that is not
    this machine's is a one-line error, not uvicorn's log line and exit."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port}: expected a TCP port from 1 to 65535 (e.g. --port 8000)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"--host {host}: not an address of this machine ({e}); use 127.0.0.1 (this machine "
                          "only) or 0.0.0.0 (every interface)") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
        sock.bind(addr)
    except OSError as e:
        sock.close()
        why = {errno.EADDRINUSE: "already in use by another program: choose another --port, or stop that program",
               errno.EACCES: "needs administrator rights (ports below 1024): choose --port 1024 or above",
               errno.EADDRNOTAVAIL: "not an address of this machine: use 127.0.0.1 or 0.0.0.0"}.get(
                   e.errno or 0, e.strerror or str(e))
        raise ConfigError(f"cannot listen on {host}:{port}: {why}") from None
    sock.set_inheritable(True)
    return sock


def run_server(app, host: str, port: int, limits: ServeLimits, sock: socket.socket | None = None) -> None:
    import uvicorn
    server = uvicorn.Server(uvicorn_config(app, host, port, limits))
    server.run(sockets=[sock] if sock is not None else None)
