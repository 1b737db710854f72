"""Hostile ``serve`` options and uploads (issue 22): token files that are devices, FIFOs or huge; ports, log files
and limits that cannot work; chunked uploads far over the limit, alone and together, with the server's resident
memory watched (``_serve_client.py`` starts the server on 127.0.0.1 only and always kills it).
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from core import Case, newest_run  # noqa: E402

FAMILY = "service"
CLIENT = str(Path(__file__).resolve().parent / "_serve_client.py")
_BUSY: list[socket.socket] = []


def config(t: Path) -> Path:
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        (t / "data" / c).mkdir(parents=True, exist_ok=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(t / "data" / c / f"{c}{i}.png")
    p = t / "svc.yaml"
    p.write_text(f"name: svc\ndata: {{path: '{t / 'data'}', image_size: 32}}\noutput_dir: '{t / 'runs'}'\n"
                 "split: {kind: holdout, test_size: 0.25, val_size: 0.0, group_by_patient: false, "
                 "allow_image_level_split: true}\n"
                 "model: {backbone: efficientnet_lite0, weights: efficientnet_lite0_packaged, freeze: frozen}\n"
                 f"train: {{epochs: 2, batch_size: 4, feature_engine: torch, cache_dir: '{t / 'cache'}', "
                 "num_workers: 0}\nevaluate: {bootstrap: 0}\n")
    return p


def serve(t: Path, name: str, opts: list[str], needles: tuple[str, ...], setup=None, timeout: float = 60) -> Case:
    """``serve RUN OPTS`` that must refuse to start, in one line, before it binds or loads anything."""
    c = Case(FAMILY, name, [], True, needles, timeout=timeout)

    def prepare() -> None:
        if setup is not None:
            setup()
        port = [] if "--port" in opts else ["--port", str(free_port())]  # never a port another program holds
        c.args = ["serve", str(newest_run(t)), "--host", "127.0.0.1", *port, *opts]
    c.setup = prepare
    return c


def scenario(t: Path, name: str, scen: str, opts: list[str] = (), timeout: float = 240) -> Case:
    c = Case(FAMILY, name, [], False, ("verdict: ok",), timeout=timeout, check=no_raw_controls)

    def prepare() -> None:
        c.cmd = [sys.executable, CLIENT, str(newest_run(t)), scen, *opts]
    c.setup = prepare
    return c


def no_raw_controls(r, t) -> tuple[str, str] | None:
    """The server's own output (its stderr is printed by the client) holds no raw terminal control character."""
    bad = sorted({repr(c) for c in r.out if (ord(c) < 32 and c not in "\n\t") or 0x7f <= ord(c) <= 0x9f})
    return ("security", f"raw control characters printed: {bad}") if bad else None


def token(t: Path, kind: str):
    def setup() -> None:
        f = t / f"token_{kind}"
        if f.exists() or f.is_symlink():
            f.unlink() if not f.is_dir() or f.is_symlink() else f.rmdir()
        if kind == "fifo":
            os.mkfifo(f, 0o600)
        elif kind == "dev_zero":
            f.symlink_to("/dev/zero")
        elif kind == "dev_urandom":
            f.symlink_to("/dev/urandom")
        elif kind == "dir":
            f.mkdir(mode=0o700)
        else:
            f.write_bytes({"huge": b"t" * 200_000_000, "binary": os.urandom(64), "empty": b"",
                           "short": b"abc\n", "two_lines": b"token-one-0123456789\ntoken-two-0123456789\n",
                           "spaces": b"token with spaces 0123456789\n", "nul": b"token-0123456789\x00abcdef\n",
                           "readable": b"token-0123456789abcdef\n", "good": b"token-0123456789abcdef\n"}[kind])
            f.chmod(0o644 if kind == "readable" else 0o600)
    return setup


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def busy_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    _BUSY.append(s)  # held open for the rest of the family
    return s.getsockname()[1]


def build(t: Path) -> list[Case]:
    cases = [Case(FAMILY, "train a tiny run to serve", ["train", str(config(t))], False, timeout=600)]
    # token files: read as one bounded line of a regular file, never waited on or read without end
    for kind, needle in (("dev_zero", "not a regular file"), ("dev_urandom", "not a regular file"),
                         ("fifo", "not a regular file"), ("dir", "not a regular file"), ("huge", "over 4096 bytes"),
                         ("binary", "--token-file"), ("empty", "at least 16"), ("short", "at least 16"),
                         ("two_lines", "at least 16"), ("spaces", "at least 16"), ("nul", "at least 16"),
                         ("readable", "chmod 600"), ("missing", "cannot read")):
        cases.append(serve(t, f"--token-file {kind}", ["--token-file", str(t / f"token_{kind}")], (needle,),
                           setup=None if kind == "missing" else token(t, kind), timeout=30))
    # ports
    for port, needle in (("-1", "--port -1"), ("0", "--port 0"), ("65536", "--port 65536"), ("70000", "--port 70000"),
                         ("abc", "--port"), ("1.5", "--port"), ("", "--port")):
        cases.append(serve(t, f"--port {port!r}", ["--port", port], (needle,)))
    busy = serve(t, "--port already in use", [], ("already in use",))
    template = busy.setup

    def in_use(c=busy, template=template) -> None:
        template()
        c.args += ["--port", str(busy_port())]
    busy.setup = in_use
    cases.append(busy)
    cases.append(serve(t, "--host not this machine", ["--host", "no-such-host.invalid"],
                       ("--host",)))
    # log files
    fifo = t / "log.fifo"
    for name, target, needle in (("a folder", str(t), "--log-file"), ("a FIFO", str(fifo), "not a regular file"),
                                 ("/dev/full", "/dev/full", "not a regular file"),
                                 ("/dev/zero", "/dev/zero", "not a regular file"),
                                 ("missing parent", str(t / "no" / "such" / "log.jsonl"), "cannot open"),
                                 ("empty name", "", "--log-file")):
        cases.append(serve(t, f"--log-file {name}", ["--log-file", target], (needle,),
                           setup=(lambda: fifo.exists() or os.mkfifo(fifo)) if name == "a FIFO" else None))
    # limits: nan, inf, negative, zero, absurd
    for opt in ("--max-upload-mb", "--max-decode-mb", "--timeout", "--body-timeout", "--header-timeout"):
        for value in ("nan", "inf", "-1", "0", "1e400"):
            cases.append(serve(t, f"{opt} {value}", [opt, value], (opt,)))
    for opt, value in (("--max-queue", "-1"), ("--max-concurrent", "0"), ("--max-pixels", "0"),
                       ("--coverage", "nan"), ("--coverage", "2")):
        cases.append(serve(t, f"{opt} {value}", [opt, value], (opt.lstrip("-"),)))
    # the running service: uploads far over the limit, alone and together; the server's memory watched
    cases += [scenario(t, "serve starts and answers /health", "health"),
              scenario(t, "serve with a good token file", "health", ["--token-file", str(t / "token_good")]),
              scenario(t, "serve with --log-file /dev/null", "health"),
              scenario(t, "60 MB chunked upload: 413 at the limit", "chunked-60"),
              scenario(t, "400 MB chunked upload: 413 at the limit", "chunked-400"),
              scenario(t, "400 MB chunked upload, 1 MB limit", "chunked-400", ["--max-upload-mb", "1"]),
              scenario(t, "60 MB upload with Content-Length: 413 first", "declared-60"),
              scenario(t, "Content-Length lie (1 KB declared, 30 MB sent)", "lying-30"),
              scenario(t, "8 concurrent 400 MB chunked uploads", "concurrent-8"),
              scenario(t, "24 concurrent 400 MB chunked uploads (beyond the queue)", "concurrent-24"),
              scenario(t, "upload named with terminal escapes", "escape-filename")]
    cases[-10].setup = _with_token(cases[-10], t)
    return cases


def _with_token(c: Case, t: Path):
    prepare = c.setup

    def setup() -> None:
        token(t, "good")()
        prepare()
    return setup
