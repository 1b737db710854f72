"""Ensembles of recipes: a run whose model is the mean of several recipes' fold models (``oncotransfer tune``'s
ensemble of its top trials, ``experiments.recipe_merge``).

``checkpoint/`` is recipe 0's own checkpoint; ``checkpoint/recipes/R/`` is recipe R's, copied whole from the run
that trained it (meta.json, model and fold files, ood.json and its tensors), so each recipe keeps its own
backbone, cut, head, temperatures and detectors, checked by its own digests. meta.json's ``recipes`` names the
folders with the digests of their meta.json and ood.json, so a folder swapped or damaged after the merge is
refused in one line. Every recipe reads the same input (size, mean, std, the same data settings) and classes:
one decoded batch feeds them all."""
from __future__ import annotations

from pathlib import Path

from oncotransfer.errors import CheckpointError
from oncotransfer.io import sha256_file
from oncotransfer.models.checkpoint import RETRAIN, checkpoint_dir

RECIPE_FILES = (("meta.json", "meta_sha256"), ("ood.json", "ood_sha256"))


def recipe_folders(run_dir: str | Path, meta: dict) -> list[Path]:
    """The checkpoint folder of each further recipe (1, 2, ...), its meta.json and ood.json checked against the
    digests the run's meta.json records."""
    ckpt = checkpoint_dir(Path(run_dir))
    folders = []
    for r, entry in enumerate(meta.get("recipes") or [], start=1):
        folder = ckpt / entry["dir"]
        for name, key in RECIPE_FILES:
            path, want = folder / name, entry.get(key)
            got = sha256_file(path) if path.is_file() else None
            if got != want:
                what = "is missing" if got is None else "is not the file checkpoint/meta.json records"
                raise CheckpointError(f"{path}: {what} (recipe {r} of the run's ensemble of recipes); {RETRAIN}")
        folders.append(folder)
    return folders


def check_same_input(first: dict, other: dict, where: Path | str) -> None:
    """Recipes of one ensemble score one decoded batch: the same classes, input size, normalisation and the data
    settings that decide which pixels are read (ultrasound region, DICOM frames)."""
    def data(m: dict) -> dict:
        d = ((m.get("config") or {}).get("data") or {})
        return {k: d.get(k) for k in ("us_region", "dicom_frames")}
    pre = ("size", "mean", "std")
    checks = [("classes", first["classes"], other["classes"]),
              ("preprocessing", [first["preprocessing"][k] for k in pre], [other["preprocessing"][k] for k in pre]),
              ("data settings", data(first), data(other))]
    for what, a, b in checks:
        if a != b:
            raise CheckpointError(f"{where}: its {what} ({b}) differ from the first recipe's ({a}); the recipes of an "
                                  "ensemble must read the same images the same way")


def with_recipe(entries: list[dict], r: int) -> list[dict]:
    """Fold entries tagged with their recipe (recipe 0's stay untagged, as in a run of one recipe)."""
    return entries if r == 0 else [{**e, "recipe": r} for e in entries]


def member_name(entry: dict) -> str:
    r = int(entry.get("recipe") or 0)
    return f"fold{entry['fold']}" if r == 0 else f"recipe{r}.fold{entry['fold']}"


def recipe_count(entries: list[dict]) -> int:
    return len({int(e.get("recipe") or 0) for e in entries})


def load_recipe_ood(run_dir: str | Path, meta: dict, entries: list[dict]):
    """``models.ood.load_ood`` over every member of ``entries`` (each recipe's detectors from its own folder):
    (OODScorer, the run's OODMeta, its shift reference) or None when the run has no detector."""
    from oncotransfer.models.ood import OODScorer, load_ood
    folders = [checkpoint_dir(Path(run_dir))] + recipe_folders(run_dir, meta)
    parts = [load_ood(folder, [int(e["fold"]) for e in entries if int(e.get("recipe") or 0) == r])
             for r, folder in enumerate(folders)]
    if len(parts) == 1 or all(p is None for p in parts):
        return parts[0]
    kinds = {(p[0].kind, p[0].pass_rate) if p is not None else None for p in parts}
    if len(kinds) > 1:
        raise CheckpointError(f"{checkpoint_dir(Path(run_dir))}: the recipes of the ensemble have different "
                              f"out-of-distribution detectors ({sorted(map(str, kinds))}); {RETRAIN}")
    scorer = OODScorer([d for p in parts for d in p[0].detectors], [t for p in parts for t in p[0].thresholds],
                       parts[0][0].kind, parts[0][0].pass_rate)
    return scorer.eval(), parts[0][1], parts[0][2]
