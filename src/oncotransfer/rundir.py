"""Leaf module: what a finished run directory is. (Typed run.json / meta.json / metrics.json models: issue 13.)"""
from __future__ import annotations

import json
from pathlib import Path


def run_finished(run_dir: str | Path, expect_report: bool = False) -> bool:
    """True when the run's results are complete: its metrics.json holds the whole pooled result (a file cut
    short by a kill or a full disk does not parse, so the run is not counted as finished) and, with
    ``expect_report``, its report.html (the last file a reported run writes) is there too."""
    path = Path(run_dir) / "metrics.json"
    try:
        complete = "pooled" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return complete and (not expect_report or (Path(run_dir) / "report.html").is_file())
