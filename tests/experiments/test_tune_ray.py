"""`oncotransfer tune --executor ray`: the trials run as Ray tasks (2 trials, Ray on 2 CPUs) and the tune ends
as a local one does. Ray runs in a loopback-only namespace, as in test_ray_executor."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_ray_executor import NS, _namespace_problem  # noqa: E402
from test_tune import DONE, SRC, tune_yaml  # noqa: E402

from oncotransfer.errors import ConfigError  # noqa: E402
from oncotransfer.experiments.tune import run_tune  # noqa: E402
from oncotransfer.rundir import run_finished  # noqa: E402
from oncotransfer.search_config import load_tune_config  # noqa: E402

SCRIPT = r'''
import json, os, sys
import ray
from oncotransfer.experiments.tune import run_tune
from oncotransfer.search_config import load_tune_config

cfg_file, temp_dir, out = sys.argv[1:]
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)
try:
    cfg, search = load_tune_config(cfg_file)
    res = run_tune(cfg, search, trials=2, executor="ray")
finally:
    ray.shutdown()
with open(out, "w") as f:
    json.dump({"driver": os.getpid(), "run": str(res.run.run_dir), "tune_dir": str(res.tune_dir)}, f)
'''


def test_tune_trials_run_as_ray_tasks(tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'oncotransfer[ray]'")
    problem = _namespace_problem()
    if problem:
        pytest.skip(problem)
    cfg = tune_yaml(tmp_path, trials=2)
    (tmp_path / "script.py").write_text(SCRIPT)
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    cmd = ["sh", "-c", 'ip link set lo up && exec "$@"', "sh", sys.executable, str(tmp_path / "script.py"),
           str(cfg), temp_dir, str(out)]
    try:
        proc = subprocess.run([*NS, *cmd], capture_output=True, text=True, timeout=900, env=env)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-3000:]
    info = json.loads(out.read_text())
    storage = f"sqlite:///{Path(info['tune_dir']) / 'study.db'}"
    for name in ("outer-0", "outer-1", "final"):
        done = optuna.load_study(study_name=name, storage=storage).get_trials(states=DONE)
        assert len(done) == 2 and all(t.intermediate_values for t in done)
        # each trial's folds trained in a Ray worker process, not in the driver
        assert all(int(t.user_attrs["ran_on"].rsplit("/", 1)[1]) != info["driver"] for t in done)
    assert run_finished(Path(info["run"])) and (Path(info["tune_dir"]) / "report.html").is_file()


def test_ray_options_do_not_apply_to_the_local_executor_and_unknown_executors_list_the_valid(tmp_path):
    cfg, search = load_tune_config(tune_yaml(tmp_path))
    with pytest.raises(ConfigError, match="--workers does not apply to the local executor"):
        run_tune(cfg, search, workers=2)
    with pytest.raises(ConfigError, match="valid: local, ray"):
        run_tune(cfg, search, executor="slurm")
