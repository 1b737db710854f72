"""The service's front door, one ASGI layer around the app: request ids, bearer-token auth, the upload-size
check, admission to the /predict queue, the body-read deadline, the catch-all 500 and the access log.

The access log is one JSON object a line: time, request id, method, route, status, milliseconds, bytes in and
out, client address. It never holds a body, a query string, an upload's file name or an unknown path (those
are where image bytes or patient identifiers could travel): an unknown path is logged as ``"other"``.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import stat
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from oncotransfer.errors import ConfigError
from oncotransfer.serve.limits import Gate

log = logging.getLogger("oncotransfer.serve")
ROUTES = {"/", "/health", "/predict", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"}
OPEN = {"/", "/health"}  # reachable without a token: the page (it asks for one) and the health check
MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the file in a multipart body
_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class _CutOff(Exception):
    """The body stopped being read: too slow (408) or too large (413)."""


def json_body(status: int, message: str) -> bytes:
    return json.dumps({"error": message, "detail": message}).encode()


class AccessLog:
    """One JSON line a request, to a file (appended) or stdout; thread-safe, flushed a line at a time."""

    def __init__(self, target: str | Path | None):
        self._lock = threading.Lock()
        self._own = target not in (None, "-")
        self._failed = False
        self._out: IO[str] | None = (open_log(target) if self._own else sys.stdout if target == "-" else None)

    def write(self, record: dict) -> None:
        if self._out is None:
            return
        line = json.dumps(record, separators=(",", ":"))
        with self._lock:
            try:
                self._out.write(line + "\n")
                self._out.flush()
            except (OSError, ValueError) as e:  # a full disk must not turn answers into errors: said once
                if not self._failed:
                    self._failed = True
                    log.error("access log: cannot write (%s); requests are served but not logged until it can", e)


def open_log(target: str | Path) -> IO[str]:
    """``--log-file`` opened to append: a regular file (created if need be) or the null device; anything else (a
    folder, a FIFO that would block the server, a device) is a one-line error."""
    fix = "give a file path to append to, or - for stdout"
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(target, flags, 0o640)
    except OSError as e:
        if os.path.exists(target) and not os.path.isdir(target) and not os.path.isfile(target):
            raise ConfigError(f"--log-file {target} is not a regular file; {fix}") from None  # a FIFO, a socket
        raise ConfigError(f"--log-file {target}: cannot open it to append ({e.strerror}); {fix}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode) and not os.path.samefile(target, os.devnull):
        os.close(fd)
        raise ConfigError(f"--log-file {target} is not a regular file; {fix}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a", encoding="utf-8", buffering=1)


class ServiceMiddleware:
    def __init__(self, app, *, gate: Gate, token: str | None, upload_limit: int, max_upload_mb: float,
                 body_timeout_s: float, access_log: AccessLog):
        self.app = app
        self.gate = gate
        self.token = token.encode() if token else None
        self.upload_limit = upload_limit
        self.max_upload_mb = max_upload_mb
        self.body_timeout_s = body_timeout_s
        self.access_log = access_log

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        if self.token is None:
            return True
        scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
        # compare_digest: the time taken does not tell how many leading bytes of a guess were right
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token)

    def _refusal(self, scope, headers, authorized: bool) -> tuple[int, str, list] | None:
        path = scope["path"]
        if not authorized and path not in OPEN:
            return (401, "missing or wrong bearer token: send the header 'Authorization: Bearer TOKEN' (the token "
                         "is in the file given to serve --token-file)",
                    [(b"www-authenticate", b'Bearer realm="oncotransfer"')])
        length = headers.get(b"content-length", b"")
        if path == "/predict" and length.isdigit() and int(length) > self.upload_limit + MULTIPART_OVERHEAD:
            # Refused before the body is read (and spooled to disk) when the client declares it too large.
            return 413, (f"upload of {int(length) / 2**20:.1f} MB exceeds the limit of {self.max_upload_mb:g} MB"), []
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if _ID.fullmatch(given) else uuid.uuid4().hex  # anything else may be an injection: replaced
        authorized = self._authorized(headers)
        st = {"status": 0, "out": 0, "in": 0, "started": False, "cut": None, "body_done": False}
        cap = self.upload_limit + MULTIPART_OVERHEAD
        state = scope.setdefault("state", {})
        state.update(request_id=rid, authorized=authorized, auth_required=self.token is not None)
        deadline = time.monotonic() + self.body_timeout_s

        async def receive_in_time():
            if st["body_done"]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.001, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                st["cut"] = (408, f"request body not received within {self.body_timeout_s:g} s")
                raise _CutOff() from None
            if message["type"] == "http.request":
                st["in"] += len(message.get("body", b""))
                st["body_done"] = not message.get("more_body", False)
                if st["in"] > cap:
                    # A body without Content-Length (chunked) is counted as it arrives and cut at the limit: the
                    # rest is never read, parsed or spooled to disk.
                    st["cut"] = (413, f"upload exceeds the limit of {self.max_upload_mb:g} MB")
                    raise _CutOff()
            return message

        async def send_tagged(message):
            if st["cut"]:
                return  # the app's answer to a cut-off body is replaced by our 408 / 413 below
            if message["type"] == "http.response.start":
                st["started"], st["status"] = True, message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            elif message["type"] == "http.response.body":
                st["out"] += len(message.get("body", b""))
            await send(message)

        async def answer(status: int, message: str, extra: list | None = None) -> None:
            body = json_body(status, message)
            await send_tagged({"type": "http.response.start", "status": status, "headers": [
                (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                *(extra or [])]})
            await send_tagged({"type": "http.response.body", "body": body})

        ticket = None
        try:
            refusal = self._refusal(scope, headers, authorized)
            if refusal is not None:
                await answer(*refusal)
            else:
                if scope["path"] == "/predict" and scope["method"] == "POST":
                    ticket = self.gate.admit()
                    if ticket is None:
                        wait = self.gate.retry_after()
                        await answer(503, f"service busy: {self.gate.capacity} requests in progress or waiting; "
                                          f"retry in {wait} s", [(b"retry-after", str(wait).encode())])
                        return
                    state["ticket"] = ticket
                await self.app(scope, receive_in_time, send_tagged)
        except _CutOff:
            pass
        except Exception as e:  # the service stays up and answers JSON whatever happens
            log.exception("unhandled error (request %s)", rid)
            if not st["started"] and not st["cut"]:
                await answer(500, f"internal error: {type(e).__name__} (request id {rid})")
        finally:
            if ticket is not None:
                ticket.release()
            if st["cut"]:
                status, message = st["cut"]
                st["cut"] = None  # let our own answer through, and close: the rest of the body is not read
                if not st["started"]:
                    await answer(status, message, [(b"connection", b"close")])
            client = scope.get("client")
            self.access_log.write({
                "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "id": rid,
                "method": scope["method"], "path": scope["path"] if scope["path"] in ROUTES else "other",
                "status": st["status"], "ms": round((time.perf_counter() - t0) * 1e3, 1),
                "bytes_in": st["in"], "bytes_out": st["out"], "client": client[0] if client else None})
