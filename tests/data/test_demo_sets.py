"""The built-in demo sets: every one listed is there with its manifest, and demo:busi (the `make demo` data) is
BUSI downscaled with its names, classes and near-duplicates kept."""
from __future__ import annotations

import csv
import itertools
from pathlib import Path

import pytest
from PIL import Image

from oncotransfer.data.demo import DEMO_SETS, demo_path
from oncotransfer.data.inspect import inspect_dataset

BUSI_DEV = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "busi-dev"


def rows(folder: Path) -> list[dict]:
    with open(folder / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", sorted(DEMO_SETS))
def test_every_demo_set_has_a_manifest_whose_files_exist(name):
    folder = demo_path(name)
    listed = rows(folder)
    assert listed and all((folder / r["path"]).is_file() for r in listed)
    on_disk = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != "manifest.csv"}
    assert on_disk == {r["path"] for r in listed}, "a file in the folder is missing from its manifest"


def test_busi_is_small_greyscale_and_keeps_the_file_names():
    folder = demo_path("busi")
    listed = rows(folder)
    assert len(listed) == 323
    assert sum(r["label"] == "benign" for r in listed) == 218 and sum(r["label"] == "malignant" for r in listed) == 105
    assert all(Path(r["path"]).parent.name == r["label"] and Path(r["path"]).stem.startswith(r["label"] + " (")
               for r in listed)
    for r in listed[::40]:
        with Image.open(folder / r["path"]) as im:
            assert im.mode == "L" and max(im.size) == 256
    assert sum(p.stat().st_size for p in folder.rglob("*")) < 5.5e6  # the wheel carries it: keep it small
    if (BUSI_DEV / "manifest.csv").is_file():
        full = {Path(r["path"]).with_suffix("").as_posix(): r["label"] for r in rows(BUSI_DEV)}
        assert full == {Path(r["path"]).with_suffix("").as_posix(): r["label"] for r in listed}


def pairs(groups: list[list[str]]) -> set[tuple[str, str]]:
    return {(a, b) for g in groups for a, b in itertools.combinations(sorted(Path(x).stem for x in g), 2)}


def test_busi_near_duplicates_survive_the_downscaling():
    """Duplicate-grouped splits depend on them: the near-identical groups (two of them filed under both classes)
    are still found in the 256 px copies."""
    rep = inspect_dataset("demo:busi")
    assert 45 <= len(rep.near_duplicates) <= 50
    cross = pairs([[x.rsplit(" (", 1)[0] for x in g] for g in rep.cross_class])  # "path (label)" -> path
    assert {("benign (333)", "malignant (77)"), ("benign (406)", "malignant (94)")} <= cross
    if (BUSI_DEV / "manifest.csv").is_file():
        full = pairs(inspect_dataset(BUSI_DEV).near_duplicates)
        assert len(full & pairs(rep.near_duplicates)) >= len(full) - 2
