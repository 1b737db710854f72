"""Ctrl-C at any point after the run folder exists names that folder, so the CLI can say how to resume."""
from __future__ import annotations

import pytest

import oncotransfer.experiments.run as run_mod
from oncotransfer.config import validate
from oncotransfer.rundir import run_finished


def test_ctrl_c_while_the_report_is_written_names_the_resumable_run(tmp_path, monkeypatch):
    cfg = validate({
        "name": "cut", "output_dir": str(tmp_path / "runs"),
        "data": {"path": "demo:osteosarcoma", "image_size": 64},
        "split": {"kind": "holdout", "allow_image_level_split": True, "group_by_patient": False},
        "model": {"backbone": "efficientnet_lite0", "weights": "efficientnet_lite0_packaged", "freeze": "frozen"},
        "train": {"epochs": 2, "cache_dir": str(tmp_path / "cache"), "num_workers": 1, "feature_engine": "torch"},
        "evaluate": {"bootstrap": 0},
    }, "test")

    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(run_mod, "evaluate_run", interrupted)
    with pytest.raises(KeyboardInterrupt) as e:
        run_mod.run_experiment(cfg)
    run_dir = e.value.run_dir
    assert (run_dir / "config.yaml").is_file() and not run_finished(run_dir)
    monkeypatch.undo()
    resumed = run_mod.run_experiment(run_dir=run_dir, resume=True)
    assert run_finished(run_dir, report=True) and 0 <= resumed.accuracy <= 1
