"""uvicorn, set up for a network: slow clients closed, header size bounded, connections capped.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) and bounds a request head to 16 KB
(``h11_max_incomplete_event_size``), but a client that trickles its headers (slowloris) is never timed out
there; ``_HeaderTimeoutProtocol`` closes a connection whose request head has not arrived within
``header_timeout_s`` of the connection or of the previous response. Slow bodies are cut off by the
middleware's body deadline (408, connection closed).
"""
from __future__ import annotations

import os
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


def read_token(path: Path) -> str:
    """The bearer token: the file's content, stripped. A missing or empty file is a one-line error; a file
    others may read is refused."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--token-file {path}: cannot read it ({e.__class__.__name__}: {e})") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise ConfigError(f"--token-file {path}: expected one token of at least 16 characters without spaces "
                          "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))' > token.txt)")
    if os.name == "posix" and os.stat(path).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"--token-file {path}: other users may read it; chmod 600 {path}")
    return token


def run_server(app, host: str, port: int, limits: ServeLimits) -> None:
    import uvicorn
    uvicorn.Server(uvicorn_config(app, host, port, limits)).run()
