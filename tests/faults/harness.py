"""Fault-test harness: real ``oncotransfer`` CLI processes that kill -9 can end, and checks of what they leave.

A fork server imports the CLI and the training stack once (no tensor operation runs in it, so there is no
thread pool for a fork to break), then forks one child per command. Each child is a separate process running
``oncotransfer.cli.main`` with its own argv, its output in a log file, exactly as the console script does;
killing it with SIGKILL is a real kill -9. This saves torch's import (seconds on the 2-core CI box) per run.
Used by tests/faults/ and benchmarks/faults.py.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

_SERVER = r"""
import json, os, sys, time
import oncotransfer.cli as cli
import oncotransfer.experiments.stages, oncotransfer.experiments.run, oncotransfer.evaluate.report  # noqa: F401
import timm, torch  # noqa: F401
print("ready", flush=True)
children = {}
for line in sys.stdin:
    job = json.loads(line)
    if "wait" in job:
        pid, deadline = int(job["wait"]), time.monotonic() + float(job["timeout"])
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rc = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                rc = "hang"
                break
            time.sleep(0.02)
        print(json.dumps({"rc": rc}), flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.chdir(job.get("cwd") or ".")
        os.environ.update(job.get("env") or {})
        sys.argv = ["oncotransfer", *job["argv"]]
        code = 0
        try:
            if "code" in job:  # a snippet of Python instead of the CLI (cache stress tests)
                exec(job["code"], {"__name__": "__fault_job__"})
            else:
                cli.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
"""


class ForkServer:
    """``start(argv, log) -> pid``; ``wait(pid, timeout) -> exit code`` (``-9`` when killed, ``"hang"`` when it
    outlived ``timeout`` and was killed); ``kill(pid)`` sends SIGKILL."""

    def __init__(self, env: dict[str, str] | None = None):
        src = Path(__file__).resolve().parents[2] / "src"
        penv = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_COLOR": "1",
                "PYTHONPATH": os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=penv)
        assert self.proc.stdout.readline().strip() == "ready", "fork server did not start"

    def _ask(self, job: dict) -> dict:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> int:
        return self._ask({"argv": [str(a) for a in argv], "log": str(log), "env": env or {}})["pid"]

    def start_code(self, code: str, log: Path) -> int:
        return self._ask({"code": code, "argv": [], "log": str(log)})["pid"]

    def wait(self, pid: int, timeout: float = 300) -> int | str:
        return self._ask({"wait": pid, "timeout": timeout})["rc"]

    def run(self, argv: list[str], log: Path, timeout: float = 300, env: dict[str, str] | None = None) -> int | str:
        return self.wait(self.start(argv, log, env), timeout)

    @staticmethod
    def kill(pid: int) -> None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def write_config(path: Path, data: Path, out: Path, cache: Path, mode: str) -> Path:
    """A tiny real config: random-weight Lite0 (no download), 32 px, fp32 PyTorch features, seeded.
    ``mode``: frozen (holdout, cached features), finetune (``last:1``: the tail on cached activations, 2 epochs)
    or kfold (3 folds, frozen)."""
    cfg = {"name": f"fault-{mode}", "output_dir": str(out),
           "data": {"path": str(data), "image_size": 32},
           "split": {"kind": "kfold" if mode == "kfold" else "holdout", "test_size": 0.25, "val_size": 0.25,
                     "group_by_patient": False, "group_duplicates": False, "allow_image_level_split": True,
                     **({"folds": 3} if mode == "kfold" else {})},
           "model": {"backbone": "efficientnet_lite0", "weights": "none",
                     "freeze": "last:1" if mode == "finetune" else "frozen"},
           "augment": {"mode": "offline", "copies": 1, "hflip": True} if mode == "frozen" else {"mode": "none"},
           "train": {"epochs": 2 if mode == "finetune" else 4, "batch_size": 8, "seed": 0, "lr": 0.003,
                     "feature_engine": "torch", "fast_cpu": False, "cache_dir": str(cache), "num_workers": 0},
           "evaluate": {"bootstrap": 0}}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def kill_when(server: ForkServer, pid: int, ready, timeout: float = 300, poll: float = 0.01) -> bool:
    """SIGKILL ``pid`` as soon as ``ready()`` is true (polled); False when the process ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if ready():
            server.kill(pid)
            return True
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child: ask the kernel whether it still runs
            done = 0 if Path(f"/proc/{pid}").exists() and "zombie" not in _state(pid) else pid
        if done:
            return False
        time.sleep(poll)
    server.kill(pid)
    return True


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def run_dirs(out: Path) -> list[Path]:
    return sorted(p for p in Path(out).glob("*") if p.is_dir())


def comparable(run_dir: Path) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """(metrics without bookkeeping, predictions, history without wall times) of a finished run."""
    from oncotransfer.rundir import read_metrics
    metrics = read_metrics(run_dir).content()
    metrics["protocol"].pop("feature_cache", None)  # names MiB of cached activations: the same, but rounded
    hist = pd.read_csv(run_dir / "history.csv").drop(columns=["seconds"])
    return metrics, pd.read_csv(run_dir / "predictions.csv"), hist


def same_results(a: Path, b: Path) -> bool:
    ma, pa, ha = comparable(a)
    mb, pb, hb = comparable(b)
    return ma == mb and pa.equals(pb) and ha.equals(hb)


def cache_problems(cache: Path) -> list[str]:
    """Every cache entry that fails to load: feature files, activation indexes and arrays, ONNX exports."""
    from safetensors import safe_open
    bad = []
    for f in Path(cache).rglob("*"):
        if not f.is_file() or f.name.startswith("."):
            continue  # temp files of a killed writer are never read (a rename publishes a file)
        try:
            if f.suffix == ".safetensors":
                with safe_open(str(f), "pt") as h:
                    n = len(json.loads(h.metadata()["shas"]))
                    assert h.get_tensor("features").shape[0] == n
            elif f.suffix == ".json":
                info = json.loads(f.read_text())
                arr = np.load(f.parent / info["file"], mmap_mode="r")
                assert arr.shape[0] == len(info["shas"])
            elif f.suffix == ".onnx":
                import onnxruntime as ort
                ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - any failure to load is what we count
            bad.append(f"{f}: {type(e).__name__}: {e}")
    return bad


def kill_and_resume(server: ForkServer, cfg: Path, out: Path, log: Path, delay: float | None = None,
                    trigger: str | None = None, timeout: float = 300) -> dict:
    """Start ``train``, kill -9 it after ``delay`` s (or as soon as a file matching the glob ``trigger`` exists
    under ``out``), check what it left, then resume (or start again when it died before its run directory
    held a config). Returns what happened, for the assertions and the table."""
    from oncotransfer.rundir import run_finished
    pid = server.start(["train", cfg], log)
    if trigger:
        kill_when(server, pid, lambda: any(Path(out).glob(trigger)), timeout)
    else:
        time.sleep(delay or 0)
        server.kill(pid)
    rc = server.wait(pid, timeout)
    dirs = [d for d in run_dirs(out) if (d / "config.yaml").is_file()]
    finished_after_kill = [d for d in dirs if run_finished(d)]
    # Without its report a train run is not finished: run_finished with and without report=True agree.
    unreported = [d for d in finished_after_kill if not run_finished(d, report=True)]
    if dirs:
        argv = ["train", cfg, "--resume", dirs[-1]]
    else:
        argv = ["train", cfg]
    rc2 = server.run(argv, log.with_suffix(".resume.log"), timeout)
    final = [d for d in run_dirs(out) if (d / "config.yaml").is_file()][-1]
    return {"killed_rc": rc, "resume_rc": rc2, "run_dir": final, "finished_after_kill": finished_after_kill,
            "unreported": unreported, "resumed": bool(dirs),
            "log": log.read_text() + log.with_suffix(".resume.log").read_text()}
