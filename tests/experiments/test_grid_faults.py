"""Faults of a grid: kill -9 of the grid process (local pool, 2 workers) at seeded random points, and Ctrl-C;
then resume.

After the grid process dies, none of its worker processes may live on (they would finish a run nobody waits
for, then die on BrokenPipeError tracebacks), the runs folder holds only whole runs, and the resumed grid's
results equal those of a grid that was never interrupted. A run whose report is missing (killed between its
metrics and its report with ``run_reports: true``) does not count as finished.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import yaml

from oncotransfer.experiments import load_grid, run_grid
from oncotransfer.rundir import run_finished

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds processes through /proc")

MARK = "ONCOTRANSFER_FAULT_MARK"
SEED = 20261201
VOLATILE = ["seconds", "run_dir"]  # wall time and where the grid was written


def write_grid(tmp: Path) -> Path:
    """12 runs (6 learning rates × 2 trials) of frozen offline Lite0 on the demo tiles at 64 px, with reports.
    Twelve, so that work is left for the third interruption: a shared frozen backbone is now set up once per
    worker, and with 8 such short runs the grid could finish inside the last kill window."""
    base = {"name": "faults", "data": {"path": "demo:osteosarcoma", "image_size": 64},
            "split": {"kind": "holdout", "test_size": 0.25, "val_size": 0.0, "group_by_patient": False,
                      "allow_image_level_split": True, "seed": 0},
            "model": {"backbone": "efficientnet_lite0", "weights": "efficientnet_lite0_packaged", "freeze": "frozen"},
            "train": {"epochs": 3, "batch_size": 16, "seed": 0, "feature_engine": "torch",
                      "cache_dir": str(tmp / "cache"), "num_workers": 1},
            "evaluate": {"bootstrap": 0}}
    path = tmp / "grid.yaml"
    grid = {"train.lr": [0.01, 0.006, 0.003, 0.001, 0.0006, 0.0003]}
    path.write_text(yaml.safe_dump({"name": "faults", "base": base, "grid": grid, "trials": 2,
                                    "output_dir": str(tmp / "out"), "run_reports": True}))
    return path


def marked(token: str) -> dict[int, int]:
    """{pid: parent pid} of the live processes (not zombies) whose environment carries ``token``: the grid and
    every process it started, directly (the fork server, the resource tracker) or not (pool workers)."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if f"{MARK}={token}".encode() not in (d / "environ").read_bytes().split(b"\0"):
                continue
            state, ppid = (d / "stat").read_text().rsplit(")", 1)[1].split()[:2]
        except OSError:  # gone meanwhile, or not ours
            continue
        if state != "Z":
            found[int(d.name)] = int(ppid)
    return found


def wait_until(condition, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while not condition() and time.monotonic() < end:
        time.sleep(0.05)
    return condition()


def _as_from_a_shell() -> None:
    """The grid starts with the signal state a terminal gives it (default Ctrl-C, nothing blocked), whatever
    the test process inherited or changed: an ignored or blocked SIGINT would be inherited and the Ctrl-C
    attempt would test nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def start_grid(grid_file: Path, token: str, stderr) -> subprocess.Popen:
    env = {**os.environ, MARK: token}
    return subprocess.Popen([sys.executable, "-m", "oncotransfer.cli", "grid", str(grid_file), "--workers", "2"],
                            env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
                            preexec_fn=_as_from_a_shell)


def in_flight(partial: Path, since_ns: int) -> bool:
    """A worker of this grid has begun a run (entries left by a killed grid are older)."""
    try:
        return any(p.stat().st_mtime_ns >= since_ns for p in partial.iterdir())
    except OSError:
        return False


def wait_for_kill_point(proc: subprocess.Popen, runs: Path, finished: int, since_ns: int) -> None:
    """Until ``finished`` more runs are whole and another is in flight."""
    before = len([p for p in runs.iterdir() if not p.name.startswith(".")]) if runs.is_dir() else 0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        done = [p for p in runs.iterdir() if not p.name.startswith(".")] if runs.is_dir() else []
        if len(done) >= before + finished and in_flight(runs / ".partial", since_ns):
            return
        time.sleep(0.02)


def test_kill_9_of_the_grid_leaves_no_workers_and_resumes_to_the_same_results(tmp_path: Path) -> None:
    grid_file = write_grid(tmp_path)
    runs = tmp_path / "out" / "grid_faults" / "runs"
    rng = random.Random(SEED)
    # kill -9 of the grid process alone (twice), then Ctrl-C as a terminal sends it: to the whole process group
    for attempt, how in enumerate(["kill", "kill", "ctrl-c"]):
        token = uuid.uuid4().hex
        err_file = tmp_path / f"stderr{attempt}.txt"
        with err_file.open("wb") as err:
            since = time.time_ns()
            proc = start_grid(grid_file, token, err)
            wait_for_kill_point(proc, runs, finished=rng.randint(0, 1), since_ns=since)
            time.sleep(rng.uniform(0.0, 0.5))
            helpers = {pid for pid, ppid in marked(token).items() if ppid == proc.pid}
            assert proc.poll() is None, "the grid ended before the kill point; choose an earlier one"
            if how == "kill":
                proc.send_signal(signal.SIGKILL)
            else:
                os.killpg(proc.pid, signal.SIGINT)
            code = proc.wait()
            # workers are the fork server's children: they must end at once. The fork server and resource
            # tracker (helpers) run no training; they exit by themselves once the last worker is gone.
            workers_gone = wait_until(lambda: not set(marked(token)) - helpers, 1.5)
            all_gone = wait_until(lambda: not marked(token), 60)
            left = marked(token)
        for pid in left:  # do not leak them into the rest of the suite, whatever the verdict
            os.kill(pid, signal.SIGKILL)
        assert workers_gone, f"attempt {attempt}: pool workers of the killed grid still alive after 1.5 s"
        assert all_gone, f"attempt {attempt}: {len(left)} process(es) of the killed grid still alive after 60 s"
        stderr = err_file.read_text(errors="replace")
        assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr[-2000:]
        # Ctrl-C stops the grid with 130, unless its last run ended within the random pause before the signal
        # and the grid had already finished (then 0 and every run whole is the right answer)
        finished_first = code == 0 and stderr.strip().splitlines()[-1].endswith("done")
        assert how == "kill" or code == 130 or finished_first, (code, stderr[-2000:])
        whole = [p for p in runs.iterdir() if not p.name.startswith(".")]
        assert all(run_finished(p, report=True) for p in whole), "a half-made run is in runs/"

    resumed: list[str] = []
    run_grid(load_grid(grid_file), workers=1, on_run_end=lambda r, d: resumed.append(r.run_id))
    assert resumed and not (runs / ".partial").exists()

    # a run killed between its metrics and its report is not finished: the next call redoes it, and only it
    victim = runs / "c001_t1"
    (victim / "report.html").unlink()
    assert not run_finished(victim, report=True) and run_finished(victim)
    spec = load_grid(grid_file)
    redone: list[str] = []
    run_grid(spec, workers=1, on_run_end=lambda r, d: redone.append(r.run_id))
    assert redone == ["c001_t1"] and (victim / "report.html").is_file()

    reference = tmp_path / "reference"
    fresh = load_grid(grid_file, [f"train.cache_dir={tmp_path / 'cache_ref'}"])  # its own feature cache too
    run_grid(replace(fresh, run_reports=False), grid_dir=reference, workers=1)  # reports change no number
    got = pd.read_csv(runs.parent / "results.csv").drop(columns=VOLATILE)
    want = pd.read_csv(reference / "results.csv").drop(columns=VOLATILE)
    assert len(want) == 12
    pd.testing.assert_frame_equal(got, want)
