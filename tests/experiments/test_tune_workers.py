"""Several `oncotransfer tune` processes on one study: two workers on one PostgreSQL study (a server this test
starts from Debian's packages, on 127.0.0.1) finish exactly the trials one would, none twice, and end with the
same result; a dead worker's lock is taken over."""
from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_tune import SRC, tune_yaml  # noqa: E402

from oncotransfer.experiments import tune_workers  # noqa: E402
from oncotransfer.rundir import run_finished  # noqa: E402

DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres():
    """A fresh PostgreSQL server on 127.0.0.1 (run as `nobody` when we are root: initdb refuses root) -> URL."""
    pytest.importorskip("psycopg", reason="the tune extra's PostgreSQL driver is missing: pip install "
                        "'oncotransfer[tune]'")
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.skip("PostgreSQL server binaries not found (apt-get install postgresql)")
    bindir = Path(found[-1]).parent
    as_user: list[str] = []
    if os.getuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("root without runuser: cannot run PostgreSQL as another user")
        as_user = ["runuser", "-u", "nobody", "--"]
    root = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))  # short: the unix socket path must stay < 108 chars
    if as_user:
        nobody = pwd.getpwnam("nobody")
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
    port, data = _free_port(), root / "data"

    def run(*cmd: str) -> None:
        proc = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=120, cwd=root)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
        f"-c listen_addresses=127.0.0.1 -p {port} -k {root}", "start")
    try:
        run(str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "tune")
        yield f"postgresql://postgres@127.0.0.1:{port}/tune"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=120, cwd=root)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_on_one_postgresql_study_share_its_trials(tmp_path, postgres):
    cfg = tune_yaml(tmp_path, trials=4)
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "oncotransfer.cli", "tune", str(cfg), "--storage", postgres, "--json"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out))
    workers = set()
    for name in ("outer-0", "outer-1", "final"):
        study = optuna.load_study(study_name=name, storage=postgres)
        done = study.get_trials(states=DONE)
        assert len(done) == 4  # as one process with --trials 4: no trial beyond the count
        params = [tuple(sorted(t.params.items())) for t in done]
        assert len(set(params)) == len(params)  # no recipe run twice
        assert not study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
        # a surplus trial (both workers asked at once) ends FAIL before training: it reported no fold
        assert all(not t.intermediate_values for t in study.get_trials(states=(optuna.trial.TrialState.FAIL,)))
        workers |= {t.user_attrs["worker"] for t in done}
    assert len(workers) == 2  # both processes ran trials
    a, b = outs  # one refit per outer fold and one final run, read by both workers
    assert a["nested"] == b["nested"] and a["recipe"] == b["recipe"] and a["run"] == b["run"]
    tune_dir = tmp_path / "runs" / "t-tune"
    assert run_finished(Path(a["run"])) and (tune_dir / "report.html").is_file()
    assert not list(tune_dir.rglob("*.lock"))
    assert "***" not in postgres and a["storage"] == postgres  # no password to hide in this URL


def test_a_dead_workers_lock_is_taken_over_and_a_live_ones_is_not(tmp_path):
    lock = tmp_path / "fold0.lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(f"{socket.gethostname()}:{int(dead.stdout)}")
    assert tune_workers.try_claim(lock) and lock.read_text() == tune_workers.WORKER
    lock.write_text(f"{socket.gethostname()}:1")  # pid 1 is alive
    assert not tune_workers.try_claim(lock)
    lock.write_text("some-other-machine:12345")  # cannot tell from here: left to its owner
    assert not tune_workers.try_claim(lock)


def _space(trial) -> dict:
    return {"lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True), "w": trial.suggest_categorical("w", [0, 16, 64])}


def test_workers_with_one_seed_draw_different_recipes_and_one_alone_keeps_the_seeded_sequence():
    plain = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    alone = tune_workers.worker_sampler(0, optuna)
    study = optuna.create_study(sampler=alone)
    for _ in range(12):
        for s in (plain, study):
            t = s.ask()
            s.tell(t, sum(_space(t).values()))
    assert [t.params for t in plain.trials] == [t.params for t in study.trials]
    shared = optuna.create_study()
    a, b = tune_workers.worker_sampler(0, optuna), tune_workers.worker_sampler(0, optuna)
    drawn = []
    for _ in range(6):  # two workers asking in turn, as two processes on one storage do
        for sampler in (a, b):
            shared.sampler = sampler
            t = shared.ask()
            drawn.append(tuple(sorted(_space(t).items())))
            shared.tell(t, 0.0)
    assert len(set(drawn)) == len(drawn)


def test_a_recipe_enqueued_by_two_workers_trains_once_and_the_worker_goes_on(tmp_path):
    """Both workers find the study empty and enqueue the base recipe (skip_if_exists is not atomic): the second
    copy ends as FAIL before training, and the study still gets its trials."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s", direction="maximize")
    for _ in range(2):
        study.enqueue_trial({"lr": 0.001, "w": 16})
    trained = []

    def objective(trial) -> float:
        tune_workers.claim_trial(trial, 3, optuna)
        params = _space(trial)
        trained.append(tuple(sorted(params.items())))
        return params["lr"]
    study.optimize(objective, n_trials=4, catch=(tune_workers.Surplus,))
    states = [t.state for t in study.trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL] + [
        optuna.trial.TrialState.COMPLETE] * 2
    assert study.trials[1].user_attrs.get("duplicate") and not study.trials[1].params
    assert len(trained) == 3 and len(set(trained)) == 3  # the base recipe once, then two new recipes
