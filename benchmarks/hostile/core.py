"""Hostile cases through the real command line, judged the same way for every family (issue 22).

A case runs ``python -m oncotransfer.cli ARGS`` (or any command) in a subprocess. Its peak resident memory is
watched (/proc, every 20 ms) and the process is killed past ``MEM_LIMIT``. Verdicts:
  ok         - the expected outcome: an error that names what it should (``want_error``), or success
  traceback  - "Traceback" in the output
  hang       - no answer within the case's time limit
  memory     - peak resident memory above ``MEM_LIMIT`` (killed)
  silent     - a silent wrong result: exit 0 where an error was due, an error that does not name what it
               should, a run folder left behind by a failed start, a check of the outputs that failed
  lost       - a run that trained and then lost its results (no metrics or report)
  security   - a defect an attacker can use (a formula cell in a CSV, raw terminal escapes, a file written
               outside its folder, a weak id-hashing key)
A family module defines ``build(t: Path) -> list[Case]``; ``run.py`` runs them all and prints the table.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
MEM_LIMIT = int(1.5 * 2**30)
VERDICTS = ("ok", "traceback", "hang", "memory", "silent", "lost", "security")


@dataclass
class Result:
    code: int | None
    out: str
    """stdout + stderr."""
    stdout: str
    stderr: str
    peak: int
    """Peak resident bytes of the process tree's root."""
    seconds: float
    timed_out: bool = False
    killed_for_memory: bool = False


Check = Callable[["Result", Path], "tuple[str, str] | None"]
"""After the run: (verdict, detail) when the outputs show a defect, else None."""


@dataclass
class Case:
    family: str
    name: str
    args: list[str]
    """CLI arguments after ``oncotransfer`` (``cmd`` replaces the whole command when given)."""
    want_error: bool
    needles: tuple[str, ...] = ()
    """Text the output must contain (whitespace-normalised)."""
    no_run_folder: bool = False
    check: Check | None = None
    timeout: float = 120
    cmd: list[str] | None = None
    stdin: bytes | None = None
    env: dict[str, str] = field(default_factory=dict)
    setup: Callable[[], None] | None = None
    """Runs just before the case (e.g. to write a file that an earlier case's run directory needs)."""


def env_for(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "COLUMNS": "400",
            "OMP_NUM_THREADS": "1", **(extra or {})}


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def execute(cmd: list[str], cwd: Path, timeout: float, env: dict[str, str], stdin: bytes | None = None,
            mem_limit: int = MEM_LIMIT) -> Result:
    """Run ``cmd`` in its own process group, watching its resident memory; kill it past the limits."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    peak, flags = [0], {"memory": False}
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.02):
            rss = _rss(p.pid)
            peak[0] = max(peak[0], rss)
            if rss > mem_limit:
                flags["memory"] = True
                _kill(p)
                return
    w = threading.Thread(target=watch, daemon=True)
    w.start()
    timed_out = False
    try:
        out, err = p.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        _kill(p)
        out, err = p.communicate()
    done.set()
    w.join()
    o, e = out.decode(errors="replace"), err.decode(errors="replace")
    return Result(p.returncode, o + e, o, e, peak[0], time.perf_counter() - t0, timed_out, flags["memory"])


def _kill(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def judge(c: Case, r: Result, t: Path, runs_before: set[Path]) -> tuple[str, str]:
    flat = " ".join(r.out.split())
    if r.killed_for_memory:
        return "memory", f"killed at {r.peak / 2**30:.2f} GiB resident"
    if r.timed_out:
        return "hang", f"no answer in {c.timeout:.0f} s"
    if "Traceback" in r.out:
        return "traceback", r.out.strip().splitlines()[-1][:110]
    if c.check is not None:
        found = c.check(r, t)
        if found:
            return found
    if c.want_error and r.code == 0:
        return "silent", f"exit 0 on bad input: {flat[-100:]}"
    if not c.want_error and r.code != 0:
        return "silent", f"failed ({r.code}): {flat[-110:]}"
    missing = [n for n in c.needles if n not in flat]
    if missing:
        return "silent", f"output does not name {missing}: {flat[-110:]}"
    runs = t / "runs"
    after = set(runs.iterdir()) if runs.is_dir() else set()
    if c.no_run_folder and after - runs_before:
        return "silent", f"left a run folder: {sorted(after - runs_before)[0].name}"
    return "ok", (r.stderr.strip().splitlines() or r.stdout.strip().splitlines() or [""])[-1][:110]


def run_case(c: Case, t: Path) -> tuple[str, str, Result]:
    runs = t / "runs"
    before = set(runs.iterdir()) if runs.is_dir() else set()
    if c.setup is not None:
        c.setup()
    cmd = c.cmd or [sys.executable, "-m", "oncotransfer.cli", *c.args]
    r = execute(cmd, t, c.timeout, env_for(c.env), c.stdin)
    verdict, detail = judge(c, r, t, before)
    return verdict, detail, r


def newest_run(t: Path) -> Path:
    """The newest run folder under ``t/runs`` (a case that needs one trains it first)."""
    return max((t / "runs").iterdir(), key=lambda p: p.stat().st_mtime)
