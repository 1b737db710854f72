"""An ensemble of recipes: two runs of one split merged into one run directory that predict, export and evaluate
load as the mean of every recipe's fold models; damaged or mismatched parts are one line."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from oncotransfer.data.demo import demo_path
from oncotransfer.errors import CheckpointError, ConfigError
from oncotransfer.experiments.recipe_merge import merge_runs
from oncotransfer.infer.predict import Predictor
from oncotransfer.rundir import run_finished


@pytest.fixture(scope="module")
def tail_run(kfold_run, tmp_path_factory):
    """The k-fold run's config with another recipe: a last:1 tail and a linear head (other tensors, another cut)."""
    from oncotransfer.config import validate
    from oncotransfer.config_yaml import read_yaml
    from oncotransfer.experiments.run import run_experiment
    raw = read_yaml(kfold_run[0] / "config.yaml")
    tmp = tmp_path_factory.mktemp("tail_run")
    raw.update(name="tail", output_dir=str(tmp / "runs"))
    raw["model"].update(freeze="last:1", head={"kind": "linear", "hidden": []})
    raw["train"].update(epochs=2, lr=0.003, cache_dir=str(tmp / "cache"))
    return run_experiment(validate(raw, "tail_run fixture")).run_dir


@pytest.fixture(scope="module")
def merged(kfold_run, tail_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("merged") / "run"
    return merge_runs(out, [kfold_run[0], tail_run], [{"trial": 3, "inner": 0.8}, {"trial": 7, "inner": 0.7}])


def _tiles(n: int) -> list[Image.Image]:
    """The first ``n`` demo tiles the runs trained on."""
    return [Image.open(p) for p in sorted(demo_path("osteosarcoma").rglob("*.jpg"))[:n]]


def _probs(run, cols):
    return pd.read_csv(run / "predictions.csv")[cols].to_numpy(float)


def test_the_merged_run_is_the_mean_of_its_recipes(kfold_run, tail_run, merged):
    assert run_finished(merged)
    meta = json.loads((merged / "checkpoint" / "meta.json").read_text())
    assert [r["dir"] for r in meta["recipes"]] == ["recipes/1"] and meta["recipes"][0]["trial"] == 7
    classes = meta["classes"]
    for prefix in ("prob_", "cal_prob_"):
        cols = [f"{prefix}{c}" for c in classes]
        want = (_probs(kfold_run[0], cols) + _probs(tail_run, cols)) / 2
        assert np.allclose(_probs(merged, cols), want, atol=1e-6)
    table = pd.read_csv(merged / "predictions.csv")
    y = table["label"].map(classes.index).to_numpy()
    accuracy = float(np.mean(_probs(merged, [f"prob_{c}" for c in classes]).argmax(1) == y))
    assert json.loads((merged / "metrics.json").read_text())["pooled"]["accuracy"] == pytest.approx(accuracy)
    assert "the mean of 2 recipes' fold models (trial 3, trial 7)" in (merged / "report.md").read_text()


def test_predict_scores_every_recipes_fold_models(kfold_run, tail_run, merged):
    both = Predictor.from_run(merged, "torch")
    assert len(both.members) == 6 and both.members[3] == {**both.members[3], "recipe": 1}
    assert "2 recipes" in both.describe()
    one, other = Predictor.from_run(kfold_run[0], "torch"), Predictor.from_run(tail_run, "torch")
    batch = both.to_uint8(_tiles(6))
    p, ood = both.predict_with_ood(batch)
    p1, o1 = one.predict_with_ood(batch)
    p2, o2 = other.predict_with_ood(batch)
    assert np.allclose(p, (p1 + p2) / 2, atol=1e-5)
    assert np.allclose(ood, (o1 + o2) / 2, rtol=1e-4, atol=1e-5)
    assert len(Predictor.from_run(merged, "torch", fold=0).members) == 2  # fold 0 of each recipe


def test_the_merged_run_exports_and_onnx_agrees(merged, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(merged, run)
    lines: list[str] = []
    onnx = Predictor.from_run(run, "onnx", log=lines.append)
    assert onnx.engine == "onnx" and any("exporting" in ln for ln in lines)
    batch = onnx.to_uint8(_tiles(4))
    torch_pred = Predictor.from_run(run, "torch")
    assert np.allclose(onnx.predict_uint8(batch), torch_pred.predict_uint8(batch), atol=1e-4)
    lines.clear()
    Predictor.from_run(run, "onnx", log=lines.append)
    from oncotransfer.infer.slides import tile_model  # predict --slide lists the members without PyTorch
    tile_model(run, log=lines.append)
    assert not any("exporting" in ln for ln in lines)  # the export is current: not made again
    held = json.loads((run / "export" / "model.json").read_text())["members"]
    assert [m.get("recipe", 0) for m in held] == [0, 0, 0, 1, 1, 1]


def test_a_damaged_recipe_folder_is_one_line(merged, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(merged, run)
    meta = run / "checkpoint" / "recipes" / "1" / "meta.json"
    meta.write_text(meta.read_text().replace('"linear"', '"mlp"'))
    with pytest.raises(CheckpointError, match=r"recipes/1/meta\.json: is not the file checkpoint/meta\.json records"):
        Predictor.from_run(run, "torch")
    shutil.rmtree(run / "checkpoint" / "recipes" / "1")
    with pytest.raises(CheckpointError, match="is missing"):
        Predictor.from_run(run, "torch")


def test_runs_of_another_split_are_not_merged(kfold_run, tail_run, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tail_run, other)
    split = pd.read_csv(other / "split.csv")
    split.loc[0, "fold"] = (split.loc[0, "fold"] + 1) % 3  # one image in another fold
    split.to_csv(other / "split.csv", index=False)
    with pytest.raises(ConfigError, match="split.csv differs"):
        merge_runs(tmp_path / "out", [kfold_run[0], other], [{}, {}])


def test_an_ensemble_of_recipes_is_not_merged_again(kfold_run, merged, tmp_path):
    with pytest.raises(ConfigError, match="already an ensemble of recipes"):
        merge_runs(tmp_path / "out", [kfold_run[0], merged], [{}, {}])


def test_a_recipe_folder_outside_the_checkpoint_is_refused(merged, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(merged, run)
    path = run / "checkpoint" / "meta.json"
    meta = json.loads(path.read_text())
    meta["recipes"][0]["dir"] = "../../elsewhere"
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"meta\.json.*recipes") as e:
        Predictor.from_run(run, "torch")
    assert "\n" not in str(e.value)
