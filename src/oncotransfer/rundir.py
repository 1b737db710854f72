"""Leaf module: what a finished run directory is. (Typed run.json / meta.json / metrics.json models: issue 13.)"""
from __future__ import annotations

import json
from pathlib import Path


def run_finished(run_dir: str | Path) -> bool:
    """True when the run's results are complete: its metrics.json holds the whole pooled result (a file cut
    short by a kill or a full disk does not parse, so the run is not counted as finished)."""
    path = Path(run_dir) / "metrics.json"
    try:
        return "pooled" in json.loads(path.read_text())
    except (OSError, ValueError):
        return False
