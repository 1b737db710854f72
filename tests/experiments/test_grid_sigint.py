"""Ctrl-C to ``oncotransfer grid`` at any moment (issue 22): while the command line loads, while the fork
server imports the training code and the pool starts, while runs train. Each ends with one line and exit 130,
no traceback (the fork server, killed mid-import, printed one and broke the pool's start with
FileNotFoundError), and no process of the grid lives on."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))  # the grid fault test's helpers, under --import-mode=importlib
from test_grid_faults import MARK, _as_from_a_shell, marked, wait_until  # noqa: E402

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds processes through /proc")


def write_grid(tmp: Path) -> Path:
    base = {"name": "sig", "data": {"path": "demo:osteosarcoma", "image_size": 32},
            "split": {"kind": "holdout", "test_size": 0.25, "val_size": 0.0, "group_by_patient": False,
                      "allow_image_level_split": True, "seed": 0},
            "model": {"backbone": "efficientnet_lite0", "weights": "efficientnet_lite0_packaged", "freeze": "frozen"},
            "train": {"epochs": 1, "batch_size": 16, "seed": 0, "feature_engine": "torch",
                      "cache_dir": str(tmp / "cache"), "num_workers": 1},
            "evaluate": {"bootstrap": 0}}
    path = tmp / "grid.yaml"
    path.write_text(yaml.safe_dump({"name": "sig", "base": base, "grid": {"train.lr": [0.01, 0.001, 0.0001]},
                                    "output_dir": str(tmp / "out")}))
    return path


def pool_started(token: str, grid_pid: int) -> bool:
    """The fork server (a child of the grid) is up: the pool is starting."""
    return any(ppid == grid_pid for ppid in marked(token).values())


@pytest.mark.parametrize("moment", ["loading", "loading+1s", "loading+2s", "pool-start", "pool-start+1s", "running"])
def test_ctrl_c_at_any_moment_is_one_line_exit_130_and_no_process_left(tmp_path, moment):
    grid = write_grid(tmp_path)
    token = uuid.uuid4().hex
    proc = subprocess.Popen([sys.executable, "-m", "oncotransfer.cli", "grid", str(grid), "--workers", "2"],
                            env={**os.environ, MARK: token}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=_as_from_a_shell)
    if moment.startswith("loading"):  # while the command imports numpy, torch...: a KeyboardInterrupt there left
        # numpy half-imported (a RecursionError traceback) or ended the process by SIGINT (-2), not exit 130
        time.sleep({"loading": 0.3, "loading+1s": 1.3, "loading+2s": 2.3}[moment])
    else:
        assert wait_until(lambda: pool_started(token, proc.pid) or proc.poll() is not None, 120)
        time.sleep({"pool-start": 0.0, "pool-start+1s": 1.0, "running": 6.0}[moment])
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=120)[0].decode(errors="replace")
    gone = wait_until(lambda: not marked(token), 30)
    for pid in marked(token):
        os.kill(pid, signal.SIGKILL)
    assert "Traceback" not in out and "Error" not in out, out[-3000:]
    lines = out.strip().splitlines()
    finished = proc.returncode == 0 and lines and lines[-1].endswith("done")  # a fast machine beat the signal
    assert finished or (proc.returncode == 130 and lines[-1].startswith("interrupted")), (proc.returncode, out[-2000:])
    assert gone, "a process of the interrupted grid is still alive after 30 s"
