"""MLflow tracking: a logged run reads back from the store (params, per-epoch history, final metrics, artefacts),
multistage nesting, the grid and train commands with --track, and one-line errors for bad trackers and stores."""
from __future__ import annotations

import csv
import json
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
import yaml

from synthetic import TWO, colour_images, tiny_grid
from oncotransfer import cli
from oncotransfer.errors import ConfigError, MissingExtraError
from oncotransfer.experiments.tracking import TrackingError, check_tracker, log_run

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite store for the module (creating its tables costs seconds); tests use their own experiments."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'm.db'}"


def fake_run(root: Path, folds: int = 2, epochs: int = 3, name: str = "fake") -> Path:
    """A finished run directory with every file log_run reads, and known values."""
    root.mkdir(parents=True)
    cfg = {"name": name, "data": {"path": "demo:x", "note": "n" * 7000},
           "model": {"backbone": "efficientnet_lite0", "head": {"hidden": [100, 50]}},
           "train": {"lr": 0.003, "epochs": epochs}, "stages": []}
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    with (root / "history.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["fold", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"])
        for k in range(folds):
            for e in range(1, epochs + 1):
                w.writerow([k, e, 1.0 / (e + k), 0.5 + 0.1 * e, 2.0 / e, 0.4 + 0.05 * e + k / 100, 0.003, 0.01])
    metrics = {"name": name, "protocol": {"split": "kfold", "image_level": False},
               "pooled": {"n": 40, "accuracy": 0.625, "accuracy_ci95": [0.5, 0.75], "roc_auc": None,
                          "per_class": {"Non-Tumor (x)": {"f1": 0.7}}, "confusion_matrix": [[1, 2], [3, 4]]}}
    (root / "metrics.json").write_text(json.dumps(metrics))
    for f in ("report.md", "report.html", "predictions.csv", "run.json"):
        (root / f).write_text("x")
    (root / "plots").mkdir()
    (root / "plots" / "history.png").write_bytes(b"png")
    (root / "checkpoint").mkdir()
    (root / "checkpoint" / "model.safetensors").write_bytes(b"weights")
    return root


def artefacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    return {f.path for f in client.list_artifacts(run_id, path)}


def test_round_trip_of_a_real_run(tiny_run: Path, tmp_path: Path, store: str) -> None:
    from oncotransfer.evaluate.report import evaluate_run
    run = Path(shutil.copytree(tiny_run, tmp_path / "run"))
    evaluate_run(run)  # the fixture skips the report; tracking should carry it
    run_id = log_run(run, tracking_uri=store)
    client = MlflowClient(tracking_uri=store)
    got = client.get_run(run_id)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert got.data.params["train.lr"] == str(cfg["train"]["lr"])
    assert got.data.params["model.backbone"] == "efficientnet_lite0"
    assert got.data.params["data.image_size"] == "128"
    assert client.get_experiment(got.info.experiment_id).name == "tiny"
    assert got.info.status == "FINISHED"

    with (run / "history.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len({r["fold"] for r in rows}) == 1  # one fold: names without a fold prefix
    for col in ("train_loss", "val_acc"):
        hist = sorted(client.get_metric_history(run_id, col), key=lambda m: m.step)
        assert [m.step for m in hist] == [int(r["epoch"]) for r in rows]
        assert [m.value for m in hist] == pytest.approx([float(r[col]) for r in rows])
    metrics = json.loads((run / "metrics.json").read_text())
    assert got.data.metrics["pooled.accuracy"] == pytest.approx(metrics["pooled"]["accuracy"])
    assert got.data.metrics["pooled.n"] == metrics["pooled"]["n"]

    listed = artefacts(client, run_id)
    assert {"config.yaml", "metrics.json", "report.html", "report.md", "history.csv", "plots"} <= listed
    assert "checkpoint" not in listed
    assert "plots/history.png" in artefacts(client, run_id, "plots")


def test_folds_names_truncation_and_checkpoint(tmp_path: Path, store: str) -> None:
    run = fake_run(tmp_path / "run", folds=2)
    run_id = log_run(run, tracking_uri=store, experiment="folds", tags={"who": "test"}, log_checkpoint=True)
    client = MlflowClient(tracking_uri=store)
    got = client.get_run(run_id)
    assert got.data.tags["who"] == "test"
    assert json.loads(got.data.params["model.head.hidden"]) == [100, 50]
    note = got.data.params["data.note"]
    assert len(note) <= 6000 and note.startswith("nnn") and note.endswith("(truncated)")
    assert [m.value for m in sorted(client.get_metric_history(run_id, "fold1/val_acc"), key=lambda m: m.step)] == \
        pytest.approx([0.4 + 0.05 * e + 0.01 for e in (1, 2, 3)])
    assert "val_acc" not in got.data.metrics
    assert (got.data.metrics["pooled.accuracy"], got.data.metrics["pooled.accuracy_ci95.1"]) == (0.625, 0.75)
    assert got.data.metrics["pooled.per_class.Non-Tumor _x_.f1"] == pytest.approx(0.7)
    assert not any("confusion" in k or "roc_auc" in k or "image_level" in k for k in got.data.metrics)
    assert "checkpoint/model.safetensors" in artefacts(client, run_id, "checkpoint")


def test_multistage_parent_nests_one_run_per_stage(tmp_path: Path, store: str) -> None:
    parent = fake_run(tmp_path / "ms", folds=1, name="ms")
    (parent / "metrics.json").unlink()
    (parent / "history.csv").unlink()
    for i, stage in enumerate(("stage1_a", "stage2_b", "direct")):
        child = fake_run(parent / stage, folds=1, name=f"ms-{stage}")
        (child / "metrics.json").write_text(json.dumps({"pooled": {"accuracy": 0.1 * (i + 1)}}))
    (parent / "stages.txt").write_text("stage1_a\nstage2_b\n")
    parent_id = log_run(parent, tracking_uri=store)
    client = MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("ms")
    runs = client.search_runs([exp.experiment_id])
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id}
    assert set(children) == {"stage1_a", "stage2_b", "direct"}
    assert children["stage2_b"].data.metrics["pooled.accuracy"] == pytest.approx(0.2)
    assert client.get_run(parent_id).data.metrics["pooled.accuracy"] == pytest.approx(0.2)  # the final stage
    assert len(runs) == 4
    assert log_run(parent, tracking_uri=store) == parent_id          # logging it again adds nothing
    assert len(client.search_runs([exp.experiment_id])) == 4


def test_logging_a_run_twice_is_one_mlflow_run(tmp_path: Path, store: str) -> None:
    run = fake_run(tmp_path / "it's run", folds=1, name="twice")       # a quote in the path, on purpose
    first = log_run(run, tracking_uri=store)
    assert log_run(run, tracking_uri=store) == first
    client = MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("twice")
    assert [r.info.run_id for r in client.search_runs([exp.experiment_id])] == [first]
    other = log_run(run, tracking_uri=store, experiment="elsewhere")    # another experiment is another record
    assert other != first
    client.set_terminated(first, "FAILED")                              # a failed upload does not count
    again = log_run(run, tracking_uri=store)
    assert again not in (first, other)


def test_default_store_sits_next_to_the_run_dirs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = fake_run(tmp_path / "runs" / "r1", folds=1)
    run_id = log_run(run)
    assert (tmp_path / "runs" / "mlflow.db").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    assert client.get_run(run_id).data.params["train.lr"] == "0.003"
    assert "report.html" in artefacts(client, run_id)
    assert (tmp_path / "runs" / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()
    assert mlflow.get_tracking_uri() != f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"  # global state untouched


def test_unknown_tracker_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown tracker; valid: mlflow"):
        log_run(tmp_path, tracker="wandb")


def test_missing_mlflow_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'oncotransfer\[mlflow\]'"):
        check_tracker("mlflow")


def test_unreachable_or_invalid_store_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    t0 = time.perf_counter()
    with pytest.raises(TrackingError, match=f"127.0.0.1:{port}") as e:
        check_tracker("mlflow", f"http://127.0.0.1:{port}")
    assert time.perf_counter() - t0 < 10 and "\n" not in str(e.value)
    with pytest.raises(TrackingError) as e:
        log_run(fake_run(tmp_path / "r", folds=1), tracking_uri="bogus://nowhere")
    assert "bogus://nowhere" in str(e.value) and "\n" not in str(e.value)


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["oncotransfer", *args])
    monkeypatch.setattr(cli.console, "width", 250)
    with pytest.raises(SystemExit) as e:
        cli.main()
    out = capsys.readouterr()
    return (e.value.code or 0), out.out, out.err


def test_train_track_bogus_fails_before_training(tmp_path: Path, monkeypatch, capsys) -> None:
    import oncotransfer.experiments.stages as stages
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(stages, "run_config", lambda *a, **k: pytest.fail("trained despite a bad --track"))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"name": "x", "data": {"path": "demo:osteosarcoma"}}))
    code, _, err = run_main(monkeypatch, capsys, "train", str(tmp_path / "c.yaml"), "--track", "bogus")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and "mlflow" in lines[0]


def test_train_command_tracks_its_run(tmp_path: Path, monkeypatch, capsys, store: str) -> None:
    import oncotransfer.experiments.stages as stages
    from oncotransfer.experiments.run import RunResult
    run = fake_run(tmp_path / "runs" / "r", folds=1, name="cli-train")
    monkeypatch.setattr(stages, "run_config", lambda *a, **k: RunResult(run, json.loads(
        (run / "metrics.json").read_text()), ["a", "b"]))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"name": "x", "data": {"path": "demo:osteosarcoma"}}))
    code, out, err = run_main(monkeypatch, capsys, "train", str(tmp_path / "c.yaml"), "--track", "mlflow",
                              "--tracking-uri", store)
    assert code == 0, err
    line = next(ln for ln in out.splitlines() if ln.startswith("tracked: mlflow run "))
    run_id = line.split()[3]
    assert line.endswith(f"in {store}")
    assert MlflowClient(tracking_uri=store).get_run(run_id).data.metrics["pooled.accuracy"] == 0.625


def make_images(root: Path, per_class: int = 6, size: int = 40) -> Path:
    return colour_images(root, TWO, per_class, size)


def test_grid_command_tracks_each_run(tmp_path: Path, monkeypatch, capsys, store: str) -> None:
    make_images(tmp_path / "img")
    grid = tiny_grid(tmp_path, {"train.lr": [0.01, 0.001]}, trials=1, name="tracked")
    code, out, err = run_main(monkeypatch, capsys, "grid", str(grid), "--track", "mlflow", "--tracking-uri", store)
    assert code == 0, err
    assert out.count("tracked: mlflow run ") == 2
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    by_cell = {(r.data.tags["cell"], r.data.tags["trial"], r.data.tags["grid"]): r for r in runs}
    assert set(by_cell) == {("c000", "0", "tracked"), ("c001", "0", "tracked")}
    r = by_cell[("c001", "0", "tracked")]
    assert r.info.run_name == "c001_t0" and r.data.params["train.lr"] == "0.001"
    saved = json.loads((tmp_path / "out" / "grid_tracked" / "runs" / "c001_t0" / "metrics.json").read_text())
    assert r.data.metrics["pooled.accuracy"] == pytest.approx(saved["pooled"]["accuracy"])
    assert len(client.get_metric_history(r.info.run_id, "train_loss")) == 2
