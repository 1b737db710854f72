"""The typed run directory: layouts, one-line errors, and what counts as a finished run."""
from __future__ import annotations

import errno
import json

import pytest

from oncotransfer.errors import CheckpointError, RunLayoutError, os_error_line
from oncotransfer.io import atomic_path, atomic_write_text
from oncotransfer.rundir import (LAYOUT, mark_unfinished, read_checkpoint_meta, read_metrics, read_run_info,
                                 run_finished, write_metrics, write_run_info)

POOLED = {"accuracy": 0.75, "n": 4, "binary": None}


PRE = {"size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def test_layout_1_files_without_a_layout_field_still_read(tmp_path):
    """Every run directory written before layouts (tests, the shipped demo docs, users' runs) reads as layout 1."""
    (tmp_path / "run.json").write_text(json.dumps({"name": "old", "classes": ["a", "b"], "seconds": 3.5}))
    (tmp_path / "metrics.json").write_text(json.dumps({"name": "old", "pooled": POOLED}))
    (tmp_path / "meta.json").write_text(json.dumps({"classes": ["a", "b"], "backbone": {"name": "x"},
                                                   "preprocessing": PRE}))
    info = read_run_info(tmp_path)
    assert info.layout == 1 and info.classes == ["a", "b"] and info.content() == {
        "name": "old", "classes": ["a", "b"], "seconds": 3.5}
    assert read_metrics(tmp_path).layout == 1
    assert read_checkpoint_meta(tmp_path).preprocessing == PRE
    assert run_finished(tmp_path)
    assert not run_finished(tmp_path, report=True)  # layout 1: the report files themselves must be there
    for f in ("report.md", "report.html"):
        (tmp_path / f).write_text("x")
    assert run_finished(tmp_path, report=True)


def test_writers_keep_the_keys_and_add_the_layout(tmp_path):
    info = {"name": "n", "classes": ["a"], "extra_key_from_a_newer_helper": [1, 2]}
    assert write_run_info(tmp_path, info) == {"layout": LAYOUT, **info}
    assert json.loads((tmp_path / "run.json").read_text()) == {"layout": LAYOUT, **info}
    assert read_run_info(tmp_path).content() == info
    written = write_metrics(tmp_path, {"name": "n", "pooled": POOLED}, report=False)
    assert written == {"layout": LAYOUT, "name": "n", "pooled": POOLED, "report": False}


def test_finished_means_metrics_in_place_and_its_report_when_asked(tmp_path):
    assert not run_finished(tmp_path)
    write_metrics(tmp_path, {"pooled": POOLED}, report=False)
    assert run_finished(tmp_path) and not run_finished(tmp_path, report=True)
    write_metrics(tmp_path, {"pooled": POOLED}, report=True)
    assert not run_finished(tmp_path, report=True)  # the flag alone is not enough: the report files must exist
    for f in ("report.md", "report.html"):
        (tmp_path / f).write_text("x")
    assert run_finished(tmp_path, report=True)
    (tmp_path / "report.html").unlink()  # removed since: the run is redone
    assert not run_finished(tmp_path, report=True) and run_finished(tmp_path)
    mark_unfinished(tmp_path)
    assert not run_finished(tmp_path)
    (tmp_path / "metrics.json").write_text('{"pooled": {"accuracy": 0.7')  # cut short
    assert not run_finished(tmp_path)


def test_newer_layout_is_one_line_naming_the_run_and_what_to_do(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"layout": LAYOUT + 1, "pooled": POOLED}))
    with pytest.raises(RunLayoutError, match=rf"{tmp_path}: written by a newer oncotransfer.*upgrade"):
        read_metrics(tmp_path)
    with pytest.raises(RunLayoutError):  # a grid must not redo (and overwrite) a run it cannot read
        run_finished(tmp_path)


def test_damaged_or_wrongly_typed_files_are_one_line(tmp_path):
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="run.json: not valid JSON"):
        read_run_info(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"classes": "a,b"}))
    with pytest.raises(CheckpointError, match="run.json: classes: "):
        read_run_info(tmp_path)
    with pytest.raises(CheckpointError, match="no metrics.json"):
        read_metrics(tmp_path)


def test_atomic_writes_leave_the_old_file_or_the_new_one_and_no_temp(tmp_path):
    target = tmp_path / "a.csv"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.csv"]


def test_storage_errors_are_one_line_naming_the_path():
    line = os_error_line(OSError(errno.ENOSPC, "No space left on device", "/runs/x/model.safetensors"))
    assert line.startswith("cannot write /runs/x/model.safetensors: No space left on device; the disk is full")
    assert "read-only" in os_error_line(OSError(errno.EROFS, "Read-only file system", "/ro"))
    assert os_error_line(OSError(errno.ECONNRESET, "reset")) is None
