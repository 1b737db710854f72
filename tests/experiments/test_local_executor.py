"""The local executor: worker processes give the numbers of one process, fill each feature cache once, keep
only whole runs when stopped, and choose their number from the kind of runs."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from synthetic import TWO, colour_images, tiny_grid
from oncotransfer.errors import ConfigError
from oncotransfer.experiments import expand, load_grid, run_grid
from oncotransfer.experiments.local_executor import default_workers
from oncotransfer.experiments.schedule import LeadersFirst
from oncotransfer.runtime import usable_cores

METRICS = ["cell", "trial", "accuracy", "balanced_accuracy", "roc_auc", "best_epochs"]


def test_worker_processes_match_one_process(tmp_path: Path) -> None:
    colour_images(tmp_path / "img", TWO, 6, 40)
    spec = load_grid(tiny_grid(tmp_path, {"train.lr": [0.05, 0.001]}, trials=2))
    logged: list[str] = []
    run_grid(spec, grid_dir=tmp_path / "one", workers=1)
    run_grid(spec, grid_dir=tmp_path / "two", workers=2, log=logged.append)
    assert "2 worker processes" in logged[0]
    one = pd.read_csv(tmp_path / "one" / "results.csv")
    two = pd.read_csv(tmp_path / "two" / "results.csv")
    pd.testing.assert_frame_equal(one[METRICS].sort_values(["cell", "trial"]).reset_index(drop=True),
                                  two[METRICS].sort_values(["cell", "trial"]).reset_index(drop=True))
    for run in ("c000_t1", "c001_t0"):   # the per-run probabilities too, to the last digit
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "one" / "runs" / run / "predictions.csv"),
                                      pd.read_csv(tmp_path / "two" / "runs" / run / "predictions.csv"))
    assert not (tmp_path / "two" / "runs" / ".partial").exists()


def test_a_stopped_pool_keeps_only_reported_runs(tmp_path: Path) -> None:
    colour_images(tmp_path / "img", TWO, 6, 40)
    spec = load_grid(tiny_grid(tmp_path, {"train.lr": [0.05, 0.01, 0.001]}, trials=2))
    reported: list[str] = []

    class Stop(Exception):
        pass

    def stop_after_three(run, run_dir) -> None:
        reported.append(run.run_id)
        if len(reported) == 3:
            raise Stop
    with pytest.raises(Stop):
        run_grid(spec, grid_dir=tmp_path / "g", workers=2, on_run_end=stop_after_three)
    on_disk = {p.name for p in (tmp_path / "g" / "runs").iterdir()}
    assert on_disk == set(reported)                      # no half-made or unreported run, no .partial folder
    rest: list[str] = []
    run_grid(spec, grid_dir=tmp_path / "g", workers=2, on_run_end=lambda r, d: rest.append(r.run_id))
    assert sorted(rest + reported) == sorted(r.run_id for r in expand(spec))


def test_leaders_fill_each_cache_before_their_group_starts(tmp_path: Path) -> None:
    colour_images(tmp_path / "img", TWO, 4, 40)
    spec = load_grid(tiny_grid(tmp_path, {"model.backbone": ["efficientnet_lite0", "mobilenet_v2"],
                                          "train.lr": [0.01, 0.001]}, trials=2))
    runs = expand(spec)
    order = LeadersFirst(runs)
    leaders = list(order.ready)
    assert [r.cfg.model.backbone for r in leaders] == ["efficientnet_lite0", "mobilenet_v2"]
    order.ready.clear()
    order.finished(leaders[1])
    assert {r.cfg.model.backbone for r in order.ready} == {"mobilenet_v2"} and len(order.ready) == 3
    order.finished(order.ready[0])                       # a follower finishing releases nothing more
    assert len(order.ready) == 3
    uncached = [r.__class__(r.cell, r.trial, r.values, r.cfg.model_copy(update={"train": r.cfg.train.model_copy(
        update={"feature_cache": False})})) for r in runs]
    assert len(LeadersFirst(uncached).ready) == len(runs)   # nothing shared, nothing held


def test_default_workers_follow_the_kind_of_run(tmp_path: Path) -> None:
    colour_images(tmp_path / "img", TWO, 4, 40)
    runs = expand(load_grid(tiny_grid(tmp_path, {"train.lr": [0.01, 0.001, 0.0001]}, trials=2)))
    assert default_workers(runs) == min(usable_cores(), len(runs))
    assert default_workers(runs[:1]) == 1
    tuned = [r.__class__(r.cell, r.trial, r.values, r.cfg.model_copy(update={"model": r.cfg.model.model_copy(
        update={"freeze": "finetune"})})) for r in runs]
    assert default_workers(tuned) == 1                   # each fine-tuning run wants every core itself


def test_bad_worker_count_is_one_line(tmp_path: Path) -> None:
    colour_images(tmp_path / "img", TWO, 4, 40)
    spec = load_grid(tiny_grid(tmp_path, {"train.lr": [0.01]}, trials=1))
    with pytest.raises(ConfigError, match="--workers 0: give a whole number >= 1"):
        run_grid(spec, workers=0)
