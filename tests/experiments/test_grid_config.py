"""The grid file schema (``GridConfig``): one-line errors naming the key, defaults, and the shipped grids; and
the one scheduling loop driving an executor through the ``schedule.Executor`` protocol."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from synthetic import TWO, colour_images, tiny_grid
from oncotransfer.errors import ConfigError
from oncotransfer.experiments import EXECUTORS, expand, load_grid, run_grid
from oncotransfer.experiments.runs import run_one
from oncotransfer.experiments.schedule import Finished

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BASE = {"name": "g", "data": {"path": "demo:osteosarcoma", "image_size": 64}, "model": {"weights": "none"}}


def write(tmp: Path, raw: dict) -> Path:
    path = tmp / "g.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("raw, needle", [
    ({"grid": {"train.lr": [0.1]}}, "exactly one of 'base'"),
    ({"base": BASE, "base_config": "x.yaml"}, "exactly one of 'base'"),
    ({"base": "x"}, "'base'"),
    ({"base": BASE, "trials": 0}, "'trials'"),
    ({"base": BASE, "trials": 2.5}, "'trials'"),
    ({"base": BASE, "grid": {"train.lr": []}}, "'grid.train.lr'"),
    ({"base": BASE, "grid": {"train.lr": 0.1}}, "'grid.train.lr'"),
    ({"base": BASE, "gird": {"train.lr": [0.1]}}, "'gird'"),
    ({"base": BASE, "name": "../elsewhere"}, "'name'"),
    ({"base": BASE, "trial_keys": [], "trials": 2}, "trial_keys"),
    ({"base": BASE, "run_reports": "maybe"}, "'run_reports'"),
    ({"base": BASE, "resources": {"cpus": True}}, "'resources.cpus'"),
])
def test_bad_grid_file_is_one_line_naming_the_key(tmp_path: Path, raw: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_grid(write(tmp_path, raw))
    assert needle in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith(str(tmp_path))


def test_empty_keys_take_their_defaults(tmp_path: Path) -> None:
    spec = load_grid(write(tmp_path, {"base": BASE, "grid": None, "trials": None, "output_dir": None}))
    assert (spec.name, spec.grid, spec.trials, spec.trial_keys) == ("g", {}, 1, ["train.seed"])
    assert spec.output_dir == str((tmp_path / "runs").resolve()) and not spec.run_reports
    assert spec.resources == {"cpus": 1.0, "gpus": 0.0} and len(expand(spec)) == 1


@pytest.mark.parametrize("name, overrides, n_runs", [("grid_figure3.yaml", [], 360), ("grid_table1.yaml", [], 90),
                                                     ("busi_dev.yaml", ["data.path=/data/busi-dev"], 5)])
def test_shipped_grids_stay_valid(name: str, overrides: list[str], n_runs: int) -> None:
    spec = load_grid(CONFIGS / name, overrides)
    runs = expand(spec)
    assert len(runs) == n_runs and len({r.run_id for r in runs}) == n_runs
    assert runs[-1].run_id == f"c{n_runs // spec.trials - 1:03d}_t{spec.trials - 1}"
    assert [r.cfg.train.seed for r in runs[:spec.trials]] == list(range(spec.trials))


class Recording:
    """A minimal executor of the protocol: runs in this process, remembering what the loop asked of it."""

    def __init__(self, spec, todo, *, workers=None):
        self.slots = None  # no cap: the loop alone decides what may start
        self.run_reports = spec.run_reports
        self.submitted: list[tuple[str, bool]] = []
        self.queue: list = []
        self.stopped = False

    def start(self, n_runs: int) -> str:
        return f"recording: {n_runs} run(s)"

    def submit(self, run, work_dir: Path, alone: bool) -> None:
        self.submitted.append((run.run_id, alone))
        self.queue.append((run, work_dir))

    def wait(self) -> Finished:
        run, work_dir = self.queue.pop(0)
        run_one(run.cfg, work_dir, self.run_reports)
        return Finished(run, 0.5, "here")

    def stop(self) -> None:
        self.stopped = True


def test_the_loop_drives_any_executor_of_the_protocol(tmp_path: Path, monkeypatch) -> None:
    colour_images(tmp_path / "img", TWO, 4, 40)
    spec = load_grid(tiny_grid(tmp_path, {"train.lr": [0.01, 0.001]}, trials=2))
    made: list[Recording] = []

    def factory(spec, todo, *, workers=None):
        made.append(Recording(spec, todo, workers=workers))
        return made[-1]
    monkeypatch.setitem(EXECUTORS, "recording", factory)
    logged: list[str] = []
    ended: list[str] = []
    run_grid(spec, "recording", grid_dir=tmp_path / "g", log=logged.append,
             on_run_end=lambda r, d: ended.append(r.run_id))
    rec = made[0]
    # the four runs share one feature cache: its leader runs alone (all cores), the rest only after it
    assert rec.submitted[0] == ("c000_t0", True) and ended[0] == "c000_t0"
    assert sorted(rec.submitted) == sorted((r.run_id, r.run_id == "c000_t0") for r in expand(spec))
    assert logged[0] == "recording: 4 run(s)" and logged[1] == "[1/4] c000_t0 {'train.lr': 0.01} 0.5 s on here"
    assert rec.stopped and sorted(ended) == sorted(r.run_id for r in expand(spec))
    assert sorted(p.name for p in (tmp_path / "g" / "runs").iterdir()) == sorted(ended)  # no .partial left
    assert len(pd.read_csv(tmp_path / "g" / "results.csv")) == 4
    with pytest.raises(ConfigError, match="--address does not apply to the recording executor"):
        run_grid(spec, "recording", grid_dir=tmp_path / "g", address="x")
