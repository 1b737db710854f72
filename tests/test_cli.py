"""The command line: listing, inspecting, and one clear ``error:`` line (no traceback) for every bad input."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from oncotransfer import cli
from oncotransfer.errors import RunInterrupted

ROOT = Path(__file__).resolve().parents[1]
EXE = ROOT / ".venv" / "bin" / "oncotransfer"


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``oncotransfer ARGS`` in-process through ``main()`` (the console-script entry point)."""
    monkeypatch.setattr(sys, "argv", ["oncotransfer", *args])
    monkeypatch.setattr(cli.console, "width", 250)   # no wrapping of tables in captured output
    with pytest.raises(SystemExit) as e:
        cli.main()
    out = capsys.readouterr()
    code = e.value.code if isinstance(e.value.code, int) else (0 if e.value.code is None else 1)
    return code, out.out, out.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert lines[0].startswith("error:"), lines[0]
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"


def png(path: Path, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (value, value, value)).save(path)


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)     # `train` creates runs/ relative to the working directory
    return tmp_path


def test_data_demo_lists_every_set(monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "data", "demo")
    assert code == 0
    assert "demo:busi" in out and "demo:osteosarcoma" in out and "demo:bus250" in out


def test_data_inspect_demo_counts(monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "data", "inspect", "demo:osteosarcoma")
    assert code == 0
    assert "60 images, 3 classes, 4 patients" in out
    for name in ("Non-Tumor", "Non-Viable-Tumor", "Viable", "Case-3", "Case-4", "Case-48", "P9"):
        assert name in out
    assert "20" in out


def test_models_list(monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "models", "list")
    assert code == 0
    for name in ("mobilenet_v2", "efficientnet_lite0", "tf_efficientnet_lite0", "resnet50"):
        assert name in out


def test_corrupt_image_is_named_and_not_fatal(tmp_path, monkeypatch, capsys):
    for c in ("a", "b"):
        for i in range(2):
            png(tmp_path / c / f"{i}.png", 40 * i)
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    code, out, err = run_main(monkeypatch, capsys, "data", "inspect", str(tmp_path))
    assert code == 0
    assert "broken.png" in err and "unreadable" in err  # warnings on stderr: the summary on stdout can be piped
    assert "warning" not in out and "images, 2 classes" in out


@pytest.mark.parametrize("case", ["missing-path", "empty-folder", "one-class"])
def test_bad_data_paths(case, tmp_path, monkeypatch, capsys):
    target = tmp_path / "d"
    if case == "empty-folder":
        target.mkdir()
    elif case == "one-class":
        for i in range(3):
            png(target / "tumor" / f"{i}.png", i * 30)
    code, _, err = run_main(monkeypatch, capsys, "data", "inspect", str(target)) if case != "one-class" else \
        _train_on(target, tmp_path, monkeypatch, capsys)
    needle = {"missing-path": "does not exist", "empty-folder": "empty", "one-class": "only 1 class"}[case]
    assert_one_line_error(code, err, needle)


def _train_on(data: Path, tmp_path: Path, monkeypatch, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: {{path: '{data}'}}\noutput_dir: '{tmp_path / 'runs'}'\n")
    return run_main(monkeypatch, capsys, "train", str(cfg))


@pytest.mark.parametrize("yaml_text,needles", [
    ("model:\n  backbone: no_such_net\n", ["unknown backbone 'no_such_net'", "efficientnet_lite0"]),
    ("no_such_key: 1\n", ["unknown key 'no_such_key'"]),
    ("train:\n  lr: -1\n", ["train.lr"]),
    ("train:\n  epochs: many\n", ["train.epochs"]),
    ("model:\n  freeze: partly\n", ["model.freeze"]),
    ("train:\n  schedule: onecycle\n  epochs: 10\n", ["train.warmup_epochs must be > 0", "warmup_epochs=3"]),
    ("train:\n  schedule: cosine\n  warmup_epochs: 30\n", ["train.warmup_epochs (30)", "train.epochs (30)"]),
])
def test_bad_configs(yaml_text, needles, in_tmp, monkeypatch, capsys):
    cfg = in_tmp / "bad.yaml"
    cfg.write_text(yaml_text)
    code, _, err = run_main(monkeypatch, capsys, "train", str(cfg))
    assert_one_line_error(code, err, *needles)


def test_missing_config_and_bad_override(in_tmp, monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "train", str(in_tmp / "none.yaml"))
    assert_one_line_error(code, err, "does not exist")
    (in_tmp / "ok.yaml").write_text("name: x\n")
    code, _, err = run_main(monkeypatch, capsys, "train", str(in_tmp / "ok.yaml"), "--set", "train.lr=-1")
    assert_one_line_error(code, err, "train.lr")


@pytest.mark.skipif(not EXE.exists(), reason="no .venv/bin/oncotransfer console script")
def test_console_script_error_is_one_line(tmp_path):
    """The real entry point, in a subprocess: exit code 2, one stderr line, no traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([str(EXE), "data", "inspect", str(tmp_path / "nope")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 2
    assert_one_line_error(p.returncode, p.stderr, "does not exist")


@pytest.mark.parametrize("args, run_dir, needle", [
    (["train", "c.yaml"], Path("runs/x"), "oncotransfer train CONFIG --resume runs/x"),
    (["train", "c.yaml"], None, "--resume RUN_DIR"),
    (["grid", "g.yaml", "--workers", "1"], Path("runs/g/run-1"), "run the same `oncotransfer grid GRID.yaml` again"),
    (["predict", "r", "a.png"], None, "interrupted"),
])
def test_ctrl_c_names_how_to_continue_the_interrupted_command(args, run_dir, needle, monkeypatch, capsys):
    def interrupt():
        raise RunInterrupted(run_dir) if run_dir else KeyboardInterrupt  # what run_experiment raises when cut short
    monkeypatch.setattr(cli, "app", interrupt)
    code, _, err = run_main(monkeypatch, capsys, *args)
    assert code == 130
    assert needle in err and "Traceback" not in err
    assert ("--resume" in err) == (args[0] == "train")


def test_ctrl_c_inside_a_real_command_names_the_run_to_resume(tmp_path, monkeypatch, capsys):
    """Through typer itself (which turns Ctrl-C into Exit(130)): the hint still names the run directory."""
    import oncotransfer.experiments.stages as stages

    def interrupted(*a, **kw):
        raise RunInterrupted("runs/cut-short")
    monkeypatch.setattr(stages, "run_config", interrupted)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {path: demo:osteosarcoma}\n")
    code, _, err = run_main(monkeypatch, capsys, "train", str(cfg))
    assert code == 130 and "--resume runs/cut-short" in err and "Traceback" not in err


def test_help_imports_no_training_code():
    """`oncotransfer --help` must stay instant: no torch, models or training modules behind it."""
    code = ("import sys; sys.argv = ['oncotransfer', '--help']\n"
            "import oncotransfer.cli as cli\n"
            "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'sklearn')\n"
            "               or m.startswith(('oncotransfer.train', 'oncotransfer.models', 'oncotransfer.experiments')))\n"
            "print('HEAVY', heavy, file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "Usage" in out.stdout
    assert "HEAVY []" in out.stderr, out.stderr


# -- issue 12: data and config faults are caught before any training, and leave no run folder -------------------

def _tiny_data(root: Path) -> Path:
    from synthetic import colour_images
    return colour_images(root, per_class=4, size=32)


def _tiny_cfg(tmp_path: Path, data: Path, extra: str = "") -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: t\ndata: {{path: '{data}', image_size: 32}}\noutput_dir: '{tmp_path / 'runs'}'\n"
                   "split: {kind: holdout, test_size: 0.25, val_size: 0.0, group_by_patient: false, "
                   "group_duplicates: false, allow_image_level_split: true}\n"
                   "model: {backbone: efficientnet_lite0, weights: none, freeze: frozen}\n"
                   f"train: {{epochs: 2, batch_size: 4, feature_engine: torch, cache_dir: '{tmp_path / 'cache'}', "
                   "num_workers: 0}\nevaluate: {bootstrap: 0}\n" + extra)
    return cfg


@pytest.mark.parametrize("override,needles", [
    ("split.seed=-1", ["split.seed", "greater than or equal to 0"]),
    (f"train.seed={2**70}", ["train.seed", "4294967295"]),
    ("model.head.hidden=[0]", ["model.head.hidden.0"]),
    ("model.head.hidden=[100,-3]", ["model.head.hidden.1"]),
    ("name=../../x", ["'name'", "plain folder name"]),
    ("name=a/b", ["'name'", "plain folder name"]),
    ("evaluate.positive_classes=[nope]", ["evaluate.positive_classes", "nope", "valid class names"]),
    ("output_dir=FILE", ["output_dir", "is a file, not a folder"]),
    ("train.cache_dir=FILE/sub", ["train.cache_dir", "is a file, not a folder"]),
])
def test_bad_values_stop_before_training_and_leave_no_run_folder(override, needles, tmp_path, monkeypatch, capsys):
    cfg = _tiny_cfg(tmp_path, _tiny_data(tmp_path / "img"))
    (tmp_path / "FILE").write_text("a file where a folder must go")
    override = override.replace("FILE", str(tmp_path / "FILE"))
    code, _, err = run_main(monkeypatch, capsys, "train", str(cfg), "--set", override)
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert not (tmp_path.parent.parent / "x").exists()


def test_empty_label_cell_fails_at_load_time_without_a_run_folder(tmp_path, monkeypatch, capsys):
    data = _tiny_data(tmp_path / "img")
    rows = [f"{c}/{c}{i}.png,{c}" for c in ("a", "b") for i in range(4)]
    rows[2] = "a/a2.png,"
    (data / "manifest.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    code, _, err = run_main(monkeypatch, capsys, "train", str(_tiny_cfg(tmp_path, data)))
    assert_one_line_error(code, err, "manifest.csv", "empty label cell on line(s) 4")
    assert not (tmp_path / "runs").exists()


def test_weights_failure_removes_the_new_run_folder(tmp_path, monkeypatch, capsys):
    cfg = _tiny_cfg(tmp_path, _tiny_data(tmp_path / "img"))
    code, _, err = run_main(monkeypatch, capsys, "train", str(cfg), "--set", f"model.weights=file:{tmp_path}/no.st")
    assert code == 2 and "Traceback" not in err
    assert not any((tmp_path / "runs").iterdir())


def test_train_prints_skipped_files_on_the_terminal(tmp_path, monkeypatch, capsys):
    data = _tiny_data(tmp_path / "img")
    for i in range(5):
        (data / "a" / f"broken{i}.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    (data / "c").mkdir()
    code, out, err = run_main(monkeypatch, capsys, "train", str(_tiny_cfg(tmp_path, data)))
    assert code == 0, err
    text = " ".join(err.split())   # the terminal wraps long lines
    line = text[text.index("warning: 5 file(s) skipped"):][:300]
    assert "5 file(s)" in line and "broken0.png" in line and "and 2 more" in line and "run.json" in line
    assert "class folder 'c'" in text


@pytest.mark.parametrize("case", ["bomb-header", "dev-null", "garbage"])
def test_data_inspect_hostile_files_one_line(case, tmp_path, monkeypatch, capsys):
    import struct
    import zlib
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    if case == "dev-null":
        code, _, err = run_main(monkeypatch, capsys, "data", "inspect", "/dev/null")
        assert_one_line_error(code, err, "/dev/null", "not a regular file")
        return
    _tiny_data(tmp_path)
    (tmp_path / "a" / "x.png").write_bytes(bomb if case == "bomb-header" else os.urandom(300))
    code, out, err = run_main(monkeypatch, capsys, "data", "inspect", str(tmp_path))
    assert code == 0 and "Traceback" not in err
    assert "x.png" in err and ("too large" if case == "bomb-header" else "unreadable") in err


def test_positive_classes_naming_every_class_stops_before_training(tmp_path, monkeypatch, capsys):
    cfg = _tiny_cfg(tmp_path, _tiny_data(tmp_path / "img"))
    code, _, err = run_main(monkeypatch, capsys, "train", str(cfg), "--set", "evaluate.positive_classes=[a,b]")
    assert_one_line_error(code, err, "evaluate.positive_classes", "names every class")
    assert not (tmp_path / "runs").exists()
