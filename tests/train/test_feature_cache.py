"""The frozen-base feature cache: same numbers as the uncached path, and never a stale entry."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from synthetic import THREE, colour_images
from oncotransfer.config import validate
from oncotransfer.models.factory import create_classifier
from oncotransfer.config import HeadConfig
from oncotransfer.experiments.run import run_experiment
from oncotransfer.train.features import FeatureCache, extract_features



def make_images(root: Path, per_class: int = 8, size: int = 48) -> Path:
    """Distinct colours per class, with a stripe texture and per-image noise so no two images are identical."""
    return colour_images(root, THREE, per_class, size, noise=12, seed=0, stripes=True, name="{c}_{i}.png")


def base_config(data: Path, tmp: Path, **train) -> dict:
    return {"name": "t", "data": {"path": str(data), "image_size": 64},
            "split": {"kind": "holdout", "test_size": 0.25, "val_size": 0.0, "group_by_patient": False,
                      "group_duplicates": False, "allow_image_level_split": True},
            "model": {"backbone": "efficientnet_lite0", "weights": "none", "freeze": "frozen"},
            "train": {"epochs": 3, "batch_size": 8, "lr": 0.01, "seed": 3, "fast_cpu": False,
                      "feature_engine": "torch", "cache_dir": str(tmp / "cache"), "num_workers": 0, **train},
            "evaluate": {"bootstrap": 0}, "output_dir": str(tmp / "runs")}


def test_cached_and_uncached_paths_agree(tmp_path: Path) -> None:
    data = make_images(tmp_path / "img")
    histories = []
    for cached in (True, False):
        cfg = validate(base_config(data, tmp_path, feature_cache=cached))
        res = run_experiment(cfg, tmp_path / f"run_{cached}", report=False)
        histories.append(pd.read_csv(res.run_dir / "history.csv"))
    a, b = histories
    for col in ("train_loss", "train_acc", "val_loss", "val_acc"):
        np.testing.assert_allclose(a[col], b[col], atol=1e-4, err_msg=col)
    pa = pd.read_csv(tmp_path / "run_True/predictions.csv")
    pb = pd.read_csv(tmp_path / "run_False/predictions.csv")
    assert (pa["pred"] == pb["pred"]).all()
    probs = [c for c in pa.columns if c.startswith("prob_")]
    np.testing.assert_allclose(pa[probs].to_numpy(), pb[probs].to_numpy(), atol=1e-4)


def _counting(fn):
    calls: list[list[int]] = []

    def run(missing: list[int]) -> torch.Tensor:
        calls.append(list(missing))
        return fn(missing)
    return run, calls


def test_changed_image_recomputes_only_that_image(tmp_path: Path) -> None:
    imgs = torch.randint(0, 255, (5, 3, 8, 8), dtype=torch.uint8)
    shas = [f"sha{i}" for i in range(5)]
    feat = lambda missing: imgs[missing].float().mean((2, 3))  # noqa: E731
    cache = FeatureCache(tmp_path, {"timm": "x", "weights": "d1"})
    compute, calls = _counting(feat)
    first = cache.get({"view": 0}, shas, compute)
    assert (cache.hits, cache.misses) == (0, 5)
    imgs[2] = 255 - imgs[2]
    shas[2] = "sha2-changed"  # new content -> new content hash
    cache2 = FeatureCache(tmp_path, {"timm": "x", "weights": "d1"})
    compute2, calls2 = _counting(feat)
    second = cache2.get({"view": 0}, shas, compute2)
    assert (cache2.hits, cache2.misses) == (4, 1) and calls2 == [[2]]
    torch.testing.assert_close(second[[0, 1, 3, 4]], first[[0, 1, 3, 4]])
    torch.testing.assert_close(second[2], imgs[2].float().mean((1, 2)))
    assert not torch.equal(second[2], first[2])


@pytest.mark.parametrize("change", [{"timm": "y"}, {"weights": "d2"}, {"pre": {"size": 96}}])
def test_changed_model_setting_uses_a_new_key(tmp_path: Path, change: dict) -> None:
    shas = ["a", "b"]
    key = {"timm": "x", "weights": "d1", "pre": {"size": 64}}
    FeatureCache(tmp_path, key).get({"view": 0}, shas, lambda m: torch.zeros(len(m), 2))
    other = FeatureCache(tmp_path, {**key, **change})
    assert other.model_key != FeatureCache(tmp_path, key).model_key
    out = other.get({"view": 0}, shas, lambda m: torch.ones(len(m), 2))
    assert (other.hits, other.misses) == (0, 2) and torch.equal(out, torch.ones(2, 2))


def test_changed_augmentation_seed_uses_a_new_view_file(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path, {"timm": "x"})
    cache.get({"view": 1, "augment": {"seed": 0}}, ["a"], lambda m: torch.zeros(len(m), 2))
    out = cache.get({"view": 1, "augment": {"seed": 1}}, ["a"], lambda m: torch.ones(len(m), 2))
    assert cache.misses == 2 and torch.equal(out, torch.ones(1, 2))
    again = cache.get({"view": 1, "augment": {"seed": 0}}, ["a"], lambda m: torch.ones(len(m), 2))
    assert cache.hits == 1 and torch.equal(again, torch.zeros(1, 2))


def test_onnx_features_match_torch(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = create_classifier("efficientnet_lite0", "none", HeadConfig(), 2, "frozen", 64).eval()
    imgs = torch.randint(0, 255, (6, 3, 64, 64), dtype=torch.uint8)
    mean, std = model.spec.mean, model.spec.std
    ref = extract_features(model.backbone, imgs, mean, std, torch.device("cpu"), False)
    cache = FeatureCache(tmp_path, {"timm": "efficientnet_lite0"}, engine="onnx")
    got = cache.extract(model.backbone, imgs, mean, std, torch.device("cpu"), False)
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) < 1e-3
    assert (tmp_path / cache.model_key / "backbone_64.onnx").is_file()


@pytest.mark.parametrize("damage", ["rows swapped", "features zeroed", "another view's file", "no digest"])
def test_a_feature_entry_that_does_not_match_its_digest_is_recomputed(tmp_path: Path, damage: str, caplog) -> None:
    """An entry whose row hashes were swapped, whose features were changed, or that holds another view's rows
    was used without a word (probabilities off by up to 0.99); it is recomputed, with a warning."""
    import json
    from oncotransfer.io import atomic_save_tensors, read_tensors
    feats = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    shas = [f"s{i}" for i in range(4)]
    calls = []

    def compute(missing):
        calls.append(list(missing))
        return feats[missing]
    cache = FeatureCache(tmp_path, {"m": 1})
    cache.get({"view": 0}, shas, compute)
    cache.get({"view": 1}, shas, lambda m: -feats[m])
    path = cache._file({"view": 0})
    tensors, meta = read_tensors(path)
    if damage == "rows swapped":
        meta["shas"] = json.dumps(shas[::-1])
    elif damage == "features zeroed":
        tensors["features"] = torch.zeros_like(tensors["features"])
    elif damage == "another view's file":
        tensors, meta = read_tensors(cache._file({"view": 1}))
    else:
        meta.pop("sha256")
    atomic_save_tensors(tensors, path, meta)
    calls.clear()
    again = FeatureCache(tmp_path, {"m": 1})
    out = again.get({"view": 0}, shas, compute)
    assert calls == [[0, 1, 2, 3]] and again.hits == 0
    assert torch.equal(out, feats)
    assert "feature cache entry" in caplog.text and "recomputed" in caplog.text
