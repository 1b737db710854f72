"""Grids: expansion, up-front validation, a tiny end-to-end grid, and resume after an interruption."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from synthetic import TWO, colour_images, tiny_grid
from oncotransfer.errors import ConfigError
from oncotransfer.experiments import expand, load_grid, run_grid


def make_images(root: Path, per_class: int = 6, size: int = 40) -> Path:
    return colour_images(root, TWO, per_class, size)


def write_grid(tmp: Path, grid: dict, trials: int = 2, **extra) -> Path:
    return tiny_grid(tmp, grid, trials, **extra)


def test_expansion_counts_and_values(tmp_path: Path) -> None:
    spec = load_grid(write_grid(tmp_path, {"train.lr": [0.1, 0.01, 0.001], "train.epochs": [3, 5]}, trials=4))
    runs = expand(spec)
    assert len(runs) == 3 * 2 * 4
    assert len({r.run_id for r in runs}) == len(runs)
    r = next(r for r in runs if r.values == {"train.lr": 0.01, "train.epochs": 5} and r.trial == 3)
    assert (r.cfg.train.lr, r.cfg.train.epochs, r.cfg.train.seed, r.cfg.split.seed) == (0.01, 5, 3, 0)


def test_augment_sections_as_grid_values(tmp_path: Path) -> None:
    spec = load_grid(write_grid(tmp_path, {"augment": [{"mode": "none"},
                                                       {"mode": "offline", "copies": 1, "hflip": True}]}, trials=1))
    runs = expand(spec)
    assert [r.cfg.augment.hflip for r in runs] == [False, True]


@pytest.mark.parametrize("grid, needle", [({"train.lrr": [0.1]}, "train.lrr"),
                                          ({"train.lr": [0.1, -1]}, "train.lr"),
                                          ({"model.backbone": ["resnet50v2"]}, "resnet50v2")])
def test_bad_grid_key_fails_up_front_in_one_line(tmp_path: Path, grid: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_grid(write_grid(tmp_path, grid))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_unknown_executor_lists_valid_ones(tmp_path: Path) -> None:
    spec = load_grid(write_grid(tmp_path, {"train.lr": [0.1]}, trials=1))
    with pytest.raises(ConfigError, match="local"):
        run_grid(spec, "slurm")


def test_tiny_grid_end_to_end_and_resume(tmp_path: Path) -> None:
    make_images(tmp_path / "img")
    spec = load_grid(write_grid(tmp_path, {"train.lr": [0.01, 0.001]}, trials=2))
    grid_dir = tmp_path / "out" / "grid_tiny"
    done: list[str] = []

    class Stop(Exception):
        pass

    def interrupt(run, run_dir) -> None:
        done.append(run.run_id)
        if len(done) == 2:
            raise Stop

    with pytest.raises(Stop):
        run_grid(spec, grid_dir=grid_dir, on_run_end=interrupt)
    finished = {p.parent.name for p in grid_dir.glob("runs/*/metrics.json")}
    assert finished == set(done)
    stamps = {d: (grid_dir / "runs" / d / "metrics.json").stat().st_mtime_ns for d in done}

    rerun: list[str] = []
    summary = run_grid(spec, grid_dir=grid_dir, on_run_end=lambda r, d: rerun.append(r.run_id))
    assert len(rerun) == 2 and not set(rerun) & set(done)
    assert all((grid_dir / "runs" / d / "metrics.json").stat().st_mtime_ns == s for d, s in stamps.items())
    for name in ("grid.yaml", "results.csv", "summary.csv", "summary.md", "figure3.png", "report.html"):
        assert (grid_dir / name).is_file(), name
    results = pd.read_csv(grid_dir / "results.csv")
    assert len(results) == 4 and set(results["train.lr"]) == {0.01, 0.001}
    for lr, part in results.groupby("train.lr"):
        row = summary[summary["train.lr"] == lr].iloc[0]
        assert row["n"] == 2
        assert row["accuracy_mean"] == pytest.approx(part["accuracy"].mean())
        assert row["accuracy_ci95_low"] <= row["accuracy_mean"] <= row["accuracy_ci95_high"]
    html, md = (grid_dir / "report.html").read_text(), (grid_dir / "report.md").read_text()
    assert "data:image/png;base64," in html and "![figure 3](figure3.png)" in md  # one source, figure embedded
    assert "## Summary per cell" in md and "<h2>Summary per cell (accuracy over trials)</h2>" in html
    assert not (grid_dir / "runs" / done[0] / "report.html").exists()  # run_reports: false


def test_changed_grid_does_not_reuse_finished_runs(tmp_path: Path) -> None:
    make_images(tmp_path / "img")
    spec = load_grid(write_grid(tmp_path, {"train.lr": [0.01]}, trials=1))
    run_grid(spec)
    changed = load_grid(write_grid(tmp_path, {"train.lr": [0.02]}, trials=1))
    with pytest.raises(ConfigError, match="different config"):
        run_grid(changed)


def test_recipe_sets_several_keys_per_cell_and_labels_the_tables(tmp_path: Path) -> None:
    make_images(tmp_path / "img")
    recipes = [{"name": "a", "train.lr": 0.01}, {"name": "b", "train.lr": 0.001, "train.epochs": 1}]
    spec = load_grid(write_grid(tmp_path, {"recipe": recipes}, trials=1))
    runs = expand(spec)
    assert [r.cell for r in runs] == ["c000", "c001"]
    assert [(r.cfg.train.lr, r.cfg.train.epochs) for r in runs] == [(0.01, 2), (0.001, 1)]  # a keeps base epochs
    summary = run_grid(spec, grid_dir=tmp_path / "g", workers=1)
    results = pd.read_csv(tmp_path / "g" / "results.csv")
    assert sorted(results["recipe"]) == ["a", "b"] and "name" not in results.columns
    assert sorted(summary["recipe"]) == ["a", "b"]
    by_name = dict(zip(results["recipe"], results["run_dir"]))
    assert len(pd.read_csv(Path(by_name["b"]) / "history.csv")) == 1  # the recipe's epochs were used
    assert len(pd.read_csv(Path(by_name["a"]) / "history.csv")) == 2


@pytest.mark.parametrize("item", [{"train.lr": 0.01}, {"name": "only a name"}, "a", {"name": 3, "train.lr": 0.1}])
def test_recipe_item_without_name_and_keys_is_a_one_line_error(tmp_path: Path, item) -> None:
    with pytest.raises(ConfigError) as e:
        load_grid(write_grid(tmp_path, {"recipe": [{"name": "ok", "train.lr": 0.1}, item]}))
    assert "'recipe'" in str(e.value) and "\n" not in str(e.value)


def test_recipe_with_a_bad_key_names_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_grid(write_grid(tmp_path, {"recipe": [{"name": "x", "train.lrr": 0.1}]}))
    assert "train.lrr" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(__import__("torch").backends.mps.is_available(), reason="this machine has an Apple GPU")
def test_a_device_this_machine_lacks_stops_a_local_grid_before_its_folder(tmp_path: Path) -> None:
    spec = load_grid(write_grid(tmp_path, {"train.device": ["cpu", "mps"]}, trials=1))
    with pytest.raises(ConfigError, match="train.device: mps was asked for"):
        run_grid(spec, "local")
    assert not Path(spec.output_dir, f"grid_{spec.name}").exists()
