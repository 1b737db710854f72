"""Config paths: written in a file, relative to that file; typed on the command line, relative to the current
folder. Shipped configs name no ../shared data and load from any folder."""
from __future__ import annotations

from pathlib import Path

import pytest

from oncotransfer.config import load_config
from oncotransfer.experiments.grid import load_grid

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def layout(tmp_path, monkeypatch):
    """configs/c.yaml naming data/tiles, beside data/tiles; and a work/ folder that is the current folder."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return tmp_path


def test_paths_in_a_file_are_relative_to_the_file(layout):
    cfg_file = layout / "configs" / "c.yaml"
    cfg_file.write_text("data: {path: ../data/tiles}\ntrain: {cache_dir: cache}\noutput_dir: ../runs\n"
                        "model: {weights: 'file:w/x.safetensors'}\n"
                        "stages:\n  - {name: a, data: {path: a_data}, init_from: ../old_run}\n")
    cfg = load_config(cfg_file)
    assert cfg.data.path == str(layout / "data" / "tiles")
    assert cfg.train.cache_dir == str(layout / "configs" / "cache")
    assert cfg.output_dir == str(layout / "runs")
    assert cfg.model.weights == f"file:{layout / 'configs' / 'w' / 'x.safetensors'}"
    assert cfg.stages[0].data.path == str(layout / "configs" / "a_data")
    assert cfg.stages[0].init_from == str(layout / "old_run")


def test_paths_typed_on_the_command_line_are_relative_to_the_current_folder(layout):
    cfg_file = layout / "configs" / "c.yaml"
    cfg_file.write_text("data: {path: ../data/tiles}\n")
    work = layout / "work"
    cfg = load_config(cfg_file, ["data.path=mine", "train.cache_dir=c", "output_dir=out", "model.weights=run:r1"])
    assert cfg.data.path == str(work / "mine")
    assert cfg.train.cache_dir == str(work / "c")
    assert cfg.output_dir == str(work / "out")
    assert cfg.model.weights == f"run:{work / 'r1'}"
    kept = load_config(cfg_file, ["data.path=demo:osteosarcoma", "model.weights=imagenet"])
    assert kept.data.path == "demo:osteosarcoma" and kept.model.weights == "imagenet"
    assert load_config(cfg_file).output_dir == "runs"  # the default stays relative to where runs are started


def test_grid_paths_follow_the_same_rule(layout):
    grid = layout / "configs" / "g.yaml"
    grid.write_text("name: g\noutput_dir: ../runs\nbase: {data: {path: ../data/tiles}}\n"
                    "grid: {data.path: [../data/a, ../data/b]}\n")
    spec = load_grid(grid)
    assert spec.base.data.path == str(layout / "data" / "tiles")
    assert spec.grid["data.path"] == [str(layout / "data" / "a"), str(layout / "data" / "b")]
    assert spec.output_dir == str(layout / "runs")
    assert load_grid(grid, ["data.path=here"]).base.data.path == str(layout / "work" / "here")


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_name_no_shared_data_and_load_anywhere(name, tmp_path, monkeypatch):
    text = (ROOT / "configs" / name).read_text()
    assert "shared" not in text, f"{name} points into ../shared, which a user's clone lacks"
    monkeypatch.chdir(tmp_path)
    if "grid:" in text:
        spec = load_grid(ROOT / "configs" / name)
        paths = [spec.base.data.path]
    elif "\nsearch:" in text:  # a tune config: the run config plus its search space
        from oncotransfer.search_config import load_tune_config
        cfg, search = load_tune_config(ROOT / "configs" / name)
        assert search.trials > 0
        paths = [cfg.data.path]
    else:
        cfg = load_config(ROOT / "configs" / name)
        paths = [cfg.data.path] + [s.data.path for s in cfg.stages if s.data]
    for p in paths:
        assert p is None or p.startswith("demo:"), f"{name}: data path {p!r} is neither demo: nor given by --data"
