"""What the CLI prints where: plain unwrapped text off a terminal, JSON on stdout alone, no ANSI codes unless a
terminal (and then none of colour under NO_COLOR), --version, and progress as bars or a few plain lines."""
from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from oncotransfer import __version__, cli
from oncotransfer.cli_output import LineProgress, Stream, emit_json, reporter, table


def run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["oncotransfer", *args])
    with pytest.raises(SystemExit) as e:
        cli.main()
    out = capsys.readouterr()
    return (e.value.code or 0), out.out, out.err


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_models_list_piped_is_whole_and_plain():
    """`oncotransfer models list | grep resnet50_v2` finds the row, with every column, no box drawing."""
    p = subprocess.run([sys.executable, "-m", "oncotransfer.cli", "models", "list"], capture_output=True,
                       text=True, timeout=120, env={**__import__("os").environ, "COLUMNS": "40"})
    assert p.returncode == 0, p.stderr
    row = next(line for line in p.stdout.splitlines() if line.startswith("resnet50_v2 "))
    assert row.split()[:3] == ["resnet50_v2", "resnetv2_50", "224"] and row.split()[-1] == "osteosarcoma"
    assert "\x1b[" not in p.stdout and "│" not in p.stdout and "…" not in p.stdout
    assert max(len(line) for line in p.stdout.splitlines()) > 80   # not cut to 80 (or COLUMNS=40) columns


def test_json_outputs_are_valid_and_alone_on_stdout(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "models", "list", "--json")
    assert code == 0
    names = {b["name"]: b for b in json.loads(out)}
    assert names["resnet50_v2"]["timm_name"] == "resnetv2_50" and names["resnet50_v2"]["input_size"] == 224
    code, out, _ = run(monkeypatch, capsys, "data", "inspect", "demo:osteosarcoma", "--json")
    assert code == 0
    rep = json.loads(out)
    assert rep["images"] == 60 and rep["patients"] == 4 and rep["per_class"]["Viable"] == 20
    assert rep["per_patient"]["P9"]["Non-Tumor"] == 8 and rep["sizes"] == [{"width": 384, "height": 384, "images": 60}]


def test_evaluate_json(tiny_run, monkeypatch, capsys):
    code, out, err = run(monkeypatch, capsys, "evaluate", str(tiny_run), "--json")
    assert code == 0, err
    doc = json.loads(out)   # NaN-free: json.loads would accept NaN, so check the text too
    assert "NaN" not in out and doc["report"].endswith("report.html")
    assert 0 <= doc["pooled"]["accuracy"] <= 1 and doc["protocol"]["split"] == "holdout"


def test_emit_json_turns_nan_and_numpy_into_json(capsys):
    import numpy as np
    emit_json({"a": float("nan"), "b": np.float32(0.5), "c": np.arange(2), "d": (1, 2)})
    assert json.loads(capsys.readouterr().out) == {"a": None, "b": 0.5, "c": [0, 1], "d": [1, 2]}


def test_version(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "--version")
    assert code == 0 and out.strip() == f"oncotransfer {__version__}"


def test_tables_on_a_terminal_are_rich_and_no_color_drops_colour(monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.delenv("NO_COLOR", raising=False)
    s = Stream()
    s.width = 120
    table(s, ["name", "value"], [["x", 1]])
    s.print("[bold red]warn[/]", markup=True)
    coloured = term.getvalue()
    assert "┃" in coloured and "\x1b[" in coloured and "\x1b[31m" in coloured.replace("1;31", "31")
    term.seek(0), term.truncate()
    monkeypatch.setenv("NO_COLOR", "1")
    table(s, ["name", "value"], [["x", 1]])
    s.print("[bold red]warn[/]", markup=True)
    assert "┃" in term.getvalue() and "\x1b[31m" not in term.getvalue() and "31m" not in term.getvalue()


def test_off_a_terminal_nothing_is_wrapped_or_coloured(capsys, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")   # rich would colour a pipe under FORCE_COLOR; we do not
    s = Stream()
    long = "x" * 300 + " [not markup] [bold]literal[/]"
    s.print(long)
    table(s, ["a", "b"], [["1", long]])
    out = capsys.readouterr().out
    assert long in out.splitlines()[0] and "\x1b[" not in out
    assert out.splitlines()[1].split() == ["a", "b"] and out.splitlines()[2].startswith("1  x")


def test_line_progress_prints_quarters_and_the_end(capsys):
    p = LineProgress(Stream(stderr=True))
    for done in range(0, 31):
        p.progress("fold 1/4 epochs", done, 30)
    for done in range(0, 3):
        p.progress("runs", done, 2)
    p.progress("fold 2/4 epochs", 0, 30)
    p.progress("fold 2/4 epochs", 12, 12)      # stopped early: ends at its last epoch
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["fold 1/4 epochs: 8/30", "fold 1/4 epochs: 15/30", "fold 1/4 epochs: 23/30",
                     "fold 1/4 epochs: 30/30 done", "runs: 1/2", "runs: 2/2 done", "fold 2/4 epochs: 12/12 done"]


def test_bars_on_a_terminal(monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    with reporter(Stream(stderr=True)) as rep:
        rep.log("a message")
        for done in range(0, 4):
            rep.progress("features", done, 3)
    text = term.getvalue()
    assert "a message" in text and "features" in text and "3/3" in text and "━" in text


def _tiny_config(tmp, monkeypatch):
    """configs/c.yaml with no data path (random-weight Lite0, 32 px, 2 epochs) and images in work/img, work/
    being the current folder."""
    import yaml
    from synthetic import colour_images, tiny_grid
    colour_images(tmp / "work" / "img")
    grid = yaml.safe_load(tiny_grid(tmp / "work", {"train.lr": [0.01]}).read_text())
    del grid["base"]["data"]["path"]
    (tmp / "configs").mkdir()
    (tmp / "configs" / "c.yaml").write_text(yaml.safe_dump({**grid["base"], "output_dir": str(tmp / "runs")}))
    (tmp / "configs" / "g.yaml").write_text(yaml.safe_dump(grid))
    monkeypatch.chdir(tmp / "work")
    return tmp / "configs"


def test_train_takes_data_from_the_current_folder_and_says_when_it_is_missing(tmp_path, monkeypatch, capsys):
    configs = _tiny_config(tmp_path, monkeypatch)
    code, _, err = run(monkeypatch, capsys, "train", str(configs / "c.yaml"))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and lines[-1].startswith("error:") and "--data PATH" in lines[-1]
    code, out, err = run(monkeypatch, capsys, "train", str(configs / "c.yaml"), "--data", "img")
    assert code == 0, err
    assert "accuracy: " in out and "\x1b[" not in out + err
    # off a terminal: one line per finished task, none per epoch
    assert "fold 1/1 features: 12/12 done" in err.splitlines() and "fold 1/1 epochs: 2/2 done" in err.splitlines()
    assert "epoch 1/2" not in err


def test_grid_data_option_and_json_summary(tmp_path, monkeypatch, capsys):
    configs = _tiny_config(tmp_path, monkeypatch)
    code, out, err = run(monkeypatch, capsys, "grid", str(configs / "g.yaml"), "--data", "img", "--json",
                         "--workers", "1")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["grid"] == "tiny" and [c["n"] for c in doc["cells"]] == [2] and doc["report"].endswith("report.html")
    assert "runs: 2/2 done" in err.splitlines()


HOSTILE_NAMES = ["x\x1b]0;owned\x07.png", "\x1b[2J\x1b[3Jclear.png", "bell\x07.png", "csi\x9b31m.png",
                 "back\x08\x08\x08.png", "cr\rspoof.png", "bidi\u202egnp.exe", "nul\x00.png", "del\x7f.png"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
@pytest.mark.parametrize("tty", [False, True])
def test_user_text_never_reaches_the_terminal_as_control_codes(monkeypatch, name: str, tty: bool):
    """A file name, label or class name with escapes prints as visible text on a terminal and in a pipe, in plain
    lines, tables (cells and headers) and progress logs; rich markup in a name prints literally."""
    term = Terminal() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stdout", term)
    monkeypatch.setenv("NO_COLOR", "1")  # rich's own styling would add ESC on a terminal otherwise
    s = Stream()
    s.width = 400
    s.print(f"warning: unreadable, skipped: {name}")
    table(s, ["path", f"[red]{name}"], [[f"[bold]{name}", 1]])
    LineProgress(s).log(name)
    out = term.getvalue()
    assert not [c for c in out if (ord(c) < 32 and c not in "\n\t") or 0x7f <= ord(c) <= 0x9f
                or 0x202a <= ord(c) <= 0x202e], repr(out)
    assert f"[red]{cli_safe(name)}" in out and f"[bold]{cli_safe(name)}" in out


def cli_safe(name: str) -> str:
    from oncotransfer.cli_output import safe_text
    return safe_text(name)


def test_safe_text_writes_controls_out_and_keeps_the_rest():
    from oncotransfer.cli_output import safe_text
    assert safe_text("a\x1b[31mb\tc\nd") == "a\\x1b[31mb\tc\nd"
    assert safe_text("\u202e") == "\\u202e" and safe_text("naïve ü 漢字") == "naïve ü 漢字"


def test_error_line_with_escapes_in_a_path_is_escaped(monkeypatch, capsys, tmp_path):
    code, out, err = run(monkeypatch, capsys, "data", "inspect", str(tmp_path / "x\x1b]0;owned\x07"))
    assert code == 2 and "\x1b" not in err and "\x07" not in err and "x\\x1b]0;owned\\x07" in err


def test_library_warnings_and_log_records_are_escaped_too(monkeypatch, capsys):
    """A pydicom/Pillow warning quotes a file name the attacker chose: it reaches stderr written out, not live."""
    import logging
    import warnings

    from oncotransfer.cli_output import escape_library_output
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    monkeypatch.setattr(logging, "_logRecordFactory", logging.getLogRecordFactory())
    escape_library_output()
    evil = "scan\x1b]0;pwned\x07\x1b[2J.dcm"
    text = warnings.formatwarning(f"cannot read {evil}", UserWarning, "lib.py", 3)
    assert "\x1b" not in text and "\\x1b]0;pwned\\x07" in text and text.endswith("\n")
    record = logging.getLogger("pydicom").makeRecord("pydicom", logging.WARNING, "f.py", 1, "bad %s", (evil,), None)
    assert record.getMessage() == "bad scan\\x1b]0;pwned\\x07\\x1b[2J.dcm"
