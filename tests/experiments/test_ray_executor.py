"""The Ray executor: same per-run metrics as the local one, resume after an interruption, clear errors.

Ray runs in a subprocess inside a user + network + PID namespace that holds only loopback (``unshare -rn
--pid``): nothing listens on this machine's interfaces, and every Ray process ends with the namespace.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from oncotransfer.errors import ConfigError, MissingExtraError
from oncotransfer.experiments import load_grid, run_grid

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
from test_grid import make_images, write_grid  # noqa: E402

NS = ["unshare", "-rn", "--pid", "--fork", "--mount-proc", "--kill-child"]

SCRIPT = r'''
import json, sys
from pathlib import Path
import ray
from oncotransfer.experiments import load_grid, run_grid

grid_file, cache, ray_dir, resume_dir, temp_dir, out = sys.argv[1:]
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)
try:
    spec = load_grid(grid_file, [f"train.cache_dir={cache}"])
    run_grid(spec, "ray", grid_dir=ray_dir)

    class Stop(Exception):
        pass

    first = []
    def stop(run, run_dir):
        first.append(run.run_id)
        if len(first) == 2:
            raise Stop
    try:
        run_grid(spec, "ray", grid_dir=resume_dir, on_run_end=stop)
    except Stop:
        pass
    runs = Path(resume_dir) / "runs"
    left = sorted(p.name for p in runs.iterdir())
    stamps = {d: (runs / d / "metrics.json").stat().st_mtime_ns for d in first}
    second = []
    run_grid(spec, "ray", grid_dir=resume_dir, on_run_end=lambda r, d: second.append(r.run_id))
    same = all((runs / d / "metrics.json").stat().st_mtime_ns == s for d, s in stamps.items())
    nodes = len(ray.nodes())
finally:
    ray.shutdown()
Path(out).write_text(json.dumps({"first": first, "left": left, "second": second, "unchanged": same,
                                 "nodes": nodes}))
'''


def _namespace_problem() -> str | None:
    """Why a loopback-only namespace cannot be had here, or None."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs unshare and ip (util-linux, iproute2) for a loopback-only network namespace"
    probe = subprocess.run([*NS, "sh", "-c", "ip link set lo up"], capture_output=True, text=True, timeout=60)
    if probe.returncode:
        return f"cannot make a loopback-only namespace (unshare -rn --pid): {probe.stderr.strip()[:200]}"
    return None


@pytest.fixture(scope="module")
def grids(tmp_path_factory):
    """One grid (2 lrs × 2 trials) run locally here and on Ray (2 CPUs) in a namespace, plus a Ray grid that
    was interrupted after two runs and then resumed."""
    pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'oncotransfer[ray]'")
    problem = _namespace_problem()
    if problem:
        pytest.skip(problem)
    import torch
    tmp = tmp_path_factory.mktemp("ray_grid")
    make_images(tmp / "img")
    grid_file = write_grid(tmp, {"train.lr": [0.01, 0.001]}, trials=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a Ray task asking for 1 CPU runs one torch thread: same arithmetic
    try:
        run_grid(load_grid(grid_file), grid_dir=tmp / "local")
    finally:
        torch.set_num_threads(threads)
    (tmp / "ray_script.py").write_text(SCRIPT)
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    out = tmp / "ray.json"
    cmd = ["sh", "-c", 'ip link set lo up && exec "$@"', "sh", sys.executable, str(tmp / "ray_script.py"),
           str(grid_file), str(tmp / "ray_cache"), str(tmp / "ray"), str(tmp / "resume"), temp_dir, str(out)]
    try:
        proc = subprocess.run([*NS, *cmd], capture_output=True, text=True, timeout=900)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert proc.returncode == 0 and out.is_file(), proc.stderr[-3000:]
    return tmp, json.loads(out.read_text())


def _runs(grid_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted((grid_dir / "runs").iterdir())}


def test_ray_matches_local_per_run(grids) -> None:
    tmp, info = grids
    local, ray = pd.read_csv(tmp / "local" / "results.csv"), pd.read_csv(tmp / "ray" / "results.csv")
    assert len(local) == len(ray) == 4 and info["nodes"] == 1
    cols = ["cell", "train.lr", "trial", "accuracy", "balanced_accuracy", "roc_auc"]
    pd.testing.assert_frame_equal(local[cols], ray[cols], rtol=0, atol=1e-6)
    assert list(_runs(tmp / "local")) == list(_runs(tmp / "ray"))
    for run_id, d in _runs(tmp / "local").items():
        r = tmp / "ray" / "runs" / run_id
        assert sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()) == \
            sorted(p.relative_to(r).as_posix() for p in r.rglob("*") if p.is_file())
        for name, keys in (("history.csv", ["train_loss", "val_loss", "train_acc"]), ("predictions.csv", None)):
            a, b = pd.read_csv(d / name), pd.read_csv(r / name)
            keys = keys or [c for c in a.columns if c.startswith("prob")]
            assert keys and all(abs(a[k] - b[k]).max() <= 1e-6 for k in keys), (run_id, name)
        ma, mb = (json.loads((x / "metrics.json").read_text())["pooled"] for x in (d, r))
        assert ma["confusion_matrix"] == mb["confusion_matrix"]
        assert {k: v for k, v in ma.items() if isinstance(v, float)} == \
            pytest.approx({k: v for k, v in mb.items() if isinstance(v, float)}, abs=1e-6)
    for name in ("summary.csv", "figure3.png", "report.html"):
        assert (tmp / "ray" / name).is_file()


def test_interrupted_ray_grid_resumes_without_rerunning(grids) -> None:
    tmp, info = grids
    first, second = info["first"], info["second"]
    assert len(first) == 2 and info["left"] == sorted(first)  # no half-written runs, no temporary folders
    assert len(second) == 2 and not set(first) & set(second) and info["unchanged"]
    assert len(pd.read_csv(tmp / "resume" / "results.csv")) == 4


def test_without_ray_the_error_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    spec = load_grid(write_grid(tmp_path, {"train.lr": [0.1]}, trials=1))
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(MissingExtraError, match=r"pip install 'oncotransfer\[ray\]'"):
        run_grid(spec, "ray", grid_dir=tmp_path / "g")


def test_unknown_executor_and_misplaced_option(tmp_path: Path) -> None:
    spec = load_grid(write_grid(tmp_path, {"train.lr": [0.1]}, trials=1))
    with pytest.raises(ConfigError, match="valid: local, ray"):
        run_grid(spec, "slurm")
    with pytest.raises(ConfigError, match="--address does not apply to the local executor"):
        run_grid(spec, "local", address="127.0.0.1:6379")


@pytest.mark.parametrize("resources, needle", [({"cpus": 2, "gpu": 1}, "'gpu'"), ({"cpus": -1}, "resources.cpus"),
                                               ({"gpus": "one"}, "resources.gpus"), ([1], "mapping")])
def test_bad_resources_fail_in_one_line(tmp_path: Path, resources, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_grid(write_grid(tmp_path, {"train.lr": [0.1]}, resources=resources))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_resources_default_and_given(tmp_path: Path) -> None:
    assert load_grid(write_grid(tmp_path, {"train.lr": [0.1]})).resources == {"cpus": 1.0, "gpus": 0.0}
    spec = load_grid(write_grid(tmp_path, {"train.lr": [0.1]}, resources={"cpus": 2, "gpus": 0.5}))
    assert spec.resources == {"cpus": 2.0, "gpus": 0.5}
