"""Tail fine-tuning on cached prefix activations: the fp16 memory-mapped activation cache, the in-memory or
streamed bank, and real runs on the demo tiles that match the uncached path; pooled-stage runs reload."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from oncotransfer.config import validate
from oncotransfer.train.activations import ActivationBank, ActivationCache

pytestmark = pytest.mark.usefixtures("one_thread")

KEY = {"timm": "tf_efficientnet_lite0", "weights": "abc", "cut": "blocks.6"}


class Source:
    """Activations of ``n`` images (N, 4, 3, 3) as ``compute`` callbacks see them, recording what was asked."""

    def __init__(self, n: int, seed: int = 0):
        self.data = np.random.default_rng(seed).normal(0, 3, (n, 4, 3, 3)).astype(np.float32)
        self.calls: list[list[int]] = []

    def compute(self, rows: list[int], order: list[int] | None = None):
        """A compute callback for ``get(shas)`` where ``shas[i]`` is image ``order[i]``."""
        def run(missing: list[int]) -> np.ndarray:
            self.calls.append(list(missing))
            idx = [order[i] for i in missing] if order is not None else missing
            return self.data[idx]
        return run

    @property
    def computed(self) -> int:
        return sum(len(c) for c in self.calls)


def shas(n: int, start: int = 0) -> list[str]:
    return [f"sha{i:03d}" for i in range(start, start + n)]


def files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- ActivationCache

def test_second_get_computes_nothing_and_rows_follow_the_requested_order(tmp_path):
    src = Source(10)
    first = ActivationCache(tmp_path, KEY)
    arr, rows = first.get({"view": 0}, shas(10), src.compute(list(range(10))), chunk=3)
    assert src.calls == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]  # chunked extraction
    assert (first.hits, first.misses) == (0, 10)
    assert arr.dtype == np.float16 and isinstance(arr, np.memmap)
    np.testing.assert_array_equal(np.asarray(arr)[rows], src.data.astype(np.float16))  # fp16 round trip
    assert not np.array_equal(np.asarray(arr)[rows].astype(np.float32), src.data)  # genuinely rounded

    again = ActivationCache(tmp_path, KEY)
    perm = [7, 2, 9, 0, 5]
    arr2, rows2 = again.get({"view": 0}, [shas(10)[i] for i in perm], src.compute(perm, perm))
    assert src.computed == 10 and (again.hits, again.misses) == (5, 0)
    np.testing.assert_array_equal(np.asarray(arr2)[rows2], src.data[perm].astype(np.float16))


def test_new_shas_are_appended_without_recomputing_old_ones(tmp_path):
    src = Source(8)
    cache = ActivationCache(tmp_path, KEY)
    cache.get({"view": 0}, shas(5), src.compute(list(range(5))))
    src.calls.clear()
    order = [6, 1, 5, 7, 0]  # two known images, three new ones, interleaved
    arr, rows = ActivationCache(tmp_path, KEY).get({"view": 0}, [f"sha{i:03d}" for i in order],
                                                   src.compute(order, order))
    assert [order[i] for c in src.calls for i in c] == [6, 5, 7]
    assert len(arr) == 8  # old rows kept, new ones appended
    np.testing.assert_array_equal(np.asarray(arr)[rows], src.data[order].astype(np.float16))
    index = json.loads(next(tmp_path.rglob("*.json")).read_text())
    assert index["shas"] == shas(5) + ["sha006", "sha005", "sha007"]
    assert len(list(tmp_path.rglob("*.npy"))) == 1  # the previous version of the rows is gone


def test_views_and_cut_points_are_separate_entries(tmp_path):
    src = Source(4)
    a = ActivationCache(tmp_path, KEY)
    a.get({"view": 0}, shas(4), src.compute(list(range(4))))
    a.get({"view": 1, "augment": {"hflip": True}}, shas(4), src.compute(list(range(4))))
    assert src.computed == 8
    other_cut = ActivationCache(tmp_path, {**KEY, "cut": "blocks.5"})
    other_cut.get({"view": 0}, shas(4), src.compute(list(range(4))))
    assert src.computed == 12 and other_cut.misses == 4


@pytest.mark.parametrize("damage", ["truncate npy", "truncate index", "index names a missing file",
                                    "fewer rows than the index"])
def test_a_damaged_entry_is_recomputed_not_trusted(tmp_path, damage):
    src = Source(6)
    ActivationCache(tmp_path, KEY).get({"view": 0}, shas(6), src.compute(list(range(6))))
    npy, index = next(tmp_path.rglob("*.npy")), next(tmp_path.rglob("*.json"))
    if damage == "truncate npy":
        npy.write_bytes(npy.read_bytes()[:-40])
    elif damage == "truncate index":
        index.write_text(index.read_text()[:25])
    elif damage == "index names a missing file":
        npy.unlink()
    else:
        info = json.loads(index.read_text())
        info["shas"].append("sha999")
        index.write_text(json.dumps(info))
    src.calls.clear()
    cache = ActivationCache(tmp_path, KEY)
    arr, rows = cache.get({"view": 0}, shas(6), src.compute(list(range(6))))
    assert src.computed == 6 and cache.hits == 0
    np.testing.assert_array_equal(np.asarray(arr)[rows], src.data.astype(np.float16))
    src.calls.clear()
    ActivationCache(tmp_path, KEY).get({"view": 0}, shas(6), src.compute(list(range(6))))
    assert src.computed == 0  # repaired: trusted again


@pytest.mark.parametrize("damage", ["rows swapped in the index", "array zeroed", "array NaN", "array of another view",
                                    "array wrong shape", "index null", "index names another file"])
def test_an_entry_that_does_not_match_its_digest_is_recomputed_with_a_warning(tmp_path, damage, caplog):
    src, other = Source(6), Source(6, seed=5)
    ActivationCache(tmp_path / "c", KEY).get({"view": 0}, shas(6), src.compute(list(range(6))))
    ActivationCache(tmp_path / "c", KEY).get({"view": 1}, shas(6), other.compute(list(range(6))))
    index = next(p for p in (tmp_path / "c").rglob("*.json") if json.loads(p.read_text())["view"] == {"view": 0})
    info = json.loads(index.read_text())
    npy = index.parent / info["file"]
    if damage == "rows swapped in the index":
        info["shas"] = info["shas"][::-1]
    elif damage == "array zeroed":
        np.save(npy, np.zeros_like(np.load(npy)))
    elif damage == "array NaN":
        np.save(npy, np.full_like(np.load(npy), np.nan))
    elif damage == "array of another view":
        other_index = next(p for p in (tmp_path / "c").rglob("*.json") if p != index)
        np.save(npy, np.load(other_index.parent / json.loads(other_index.read_text())["file"]))
    elif damage == "array wrong shape":
        np.save(npy, np.load(npy).reshape(6, -1)[:, :5].copy())
    elif damage == "index names another file":
        info["file"] = "x.npy"
    index.write_text("null" if damage == "index null" else json.dumps(info))
    src.calls.clear()
    cache = ActivationCache(tmp_path / "c", KEY)
    arr, rows = cache.get({"view": 0}, shas(6), src.compute(list(range(6))))
    assert src.computed == 6 and cache.hits == 0
    np.testing.assert_array_equal(np.asarray(arr)[rows], src.data.astype(np.float16))
    assert "activation cache entry" in caplog.text and "recomputed" in caplog.text


@pytest.mark.parametrize("name", ["../../../victim.txt", "ABS"])
def test_an_index_naming_a_file_outside_the_cache_never_touches_it(tmp_path, name):
    """The rewrite of an entry removed the file its old index named: an index climbing out of the cache
    (``../../x``) made it delete a file anywhere. Only the entry's own file beside its index is read or removed."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    cache_root = tmp_path / "deep" / "cache"
    src = Source(4)
    ActivationCache(cache_root, KEY).get({"view": 0}, shas(3), src.compute(list(range(3))))
    index = next(cache_root.rglob("*.json"))
    info = json.loads(index.read_text())
    info["file"] = str(victim) if name == "ABS" else name
    assert (index.parent / info["file"]).resolve() == victim.resolve()
    index.write_text(json.dumps(info))
    arr, rows = ActivationCache(cache_root, KEY).get({"view": 0}, shas(4), src.compute(list(range(4))))
    assert victim.read_text() == "keep me"
    np.testing.assert_array_equal(np.asarray(arr)[rows], src.data[:4].astype(np.float16))


# ---------------------------------------------------------------- ActivationBank

def bank_views(tmp_path, n: int = 12):
    src0, src1 = Source(n, seed=0), Source(n, seed=1)
    cache = ActivationCache(tmp_path, KEY)
    order = list(range(n))[::-1]  # rows on disk in a different order from the data set
    cache.get({"view": 0}, [shas(n)[i] for i in order], src0.compute(order, order))
    v0 = cache.get({"view": 0}, shas(n), src0.compute(list(range(n))))
    v1 = cache.get({"view": 1}, shas(n), src1.compute(list(range(n))))
    return [v0, v1], src0.data, src1.data


def test_bank_streams_under_its_budget_and_gathers_the_same_rows(tmp_path):
    views, d0, d1 = bank_views(tmp_path)
    need = 2 * 12 * 4 * 3 * 3 * 2  # two views, fp16
    memory, exact = ActivationBank(views, 1 << 20), ActivationBank(views, need)
    streamed, just_over = ActivationBank(views, 0), ActivationBank(views, need - 1)
    assert memory.nbytes == need
    assert (memory.streaming, exact.streaming, streamed.streaming, just_over.streaming) == (False, False, True, True)
    assert not isinstance(memory._views[0][0], np.memmap) and isinstance(streamed._views[0][0], np.memmap)
    view = np.array([1, 0, 0, 1, 1, 0, 1])
    pos = np.array([3, 3, 11, 0, 7, 5, 3])
    got = streamed.gather(view, pos)
    assert got.dtype == torch.float32 and got.shape == (7, 4, 3, 3)
    torch.testing.assert_close(got, memory.gather(view, pos), rtol=0, atol=0)
    want = np.stack([(d1 if v else d0)[p] for v, p in zip(view, pos)]).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got.numpy(), want)


def test_in_memory_bank_keeps_only_the_rows_it_was_given(tmp_path):
    views, d0, _ = bank_views(tmp_path)
    arr, rows = views[0]
    sub = rows[[2, 8]]
    bank = ActivationBank([(arr, sub)], 1 << 20)
    assert bank._views[0][0].shape[0] == 2
    np.testing.assert_array_equal(bank.gather(np.zeros(2, np.int64), np.array([1, 0])).numpy(),
                                  d0[[8, 2]].astype(np.float16).astype(np.float32))


# ---------------------------------------------------------------- which runs use the tail cache

@pytest.mark.parametrize("model, train, uses", [
    ({"freeze": "last:1"}, {}, True), ({"freeze": "from:blocks.5"}, {}, True),
    ({"freeze": "last:1"}, {"tail_cache": False}, False), ({"freeze": "last:1"}, {"feature_cache": False}, False),
    ({"freeze": "frozen"}, {}, False), ({"freeze": "finetune"}, {}, False)])
def test_uses_tail_cache(model, train, uses):
    from oncotransfer.train.fold import uses_tail_cache
    assert uses_tail_cache(validate({"model": model, "train": train})) is uses


# ---------------------------------------------------------------- real runs on the demo tiles

SIZE = 96


def demo_config(tmp: Path, name: str, model: dict, **train) -> dict:
    """Packaged ImageNet Lite0 on the 60 demo tiles, 96 px, one offline augmented copy, fp32 (fast_cpu false:
    with bf16 autocast the uncached path's loss drifts ~3% from the cached one, which would hide real bugs)."""
    return validate({
        "name": name, "output_dir": str(tmp / "runs"),
        "data": {"path": "demo:osteosarcoma", "image_size": SIZE},
        "split": {"kind": "holdout", "test_size": 0.25, "val_size": 0.2, "allow_image_level_split": True,
                  "group_by_patient": False, "group_duplicates": False},
        "model": {"backbone": "efficientnet_lite0", "weights": "efficientnet_lite0_packaged", **model},
        "augment": {"mode": "offline", "copies": 1, "hflip": True, "rotation": 10},
        "train": {"epochs": 3, "batch_size": 16, "lr": 1e-3, "cache_dir": str(tmp / "cache"), "num_workers": 0,
                  "feature_engine": "torch", "fast_cpu": False, **train},
        "evaluate": {"bootstrap": 0}}, name)


@pytest.fixture(scope="module")
def demo_data():
    from oncotransfer.train.data import load_data
    cfg = demo_config(Path("."), "x", {"freeze": "frozen"})
    return load_data(cfg.data, SIZE, 0, phash=False)


def outputs(run_dir: Path):
    h, p = pd.read_csv(run_dir / "history.csv"), pd.read_csv(run_dir / "predictions.csv")
    cols = [c for c in p.columns if c.startswith("prob_")]
    return h, p, p[cols].to_numpy()


def test_tail_cache_matches_recomputing_the_prefix_and_reuses_its_cache(tmp_path, demo_data):
    from oncotransfer.models.backbones import get_backbone
    from oncotransfer.models.weights import build_backbone
    from oncotransfer.models.factory import load_classifier
    from oncotransfer.experiments.run import run_experiment
    cache = tmp_path / "cache"
    run = lambda name, **train: run_experiment(  # noqa: E731
        demo_config(tmp_path, name, {"freeze": "last:1"}, **train), data=demo_data, report=False).run_dir
    cached = run("cached", tail_cache=True)
    stored = files(cache)
    assert any(f.endswith(".npy") for f in stored) and any(f.endswith(".json") for f in stored)
    plain = run("plain", tail_cache=False)
    assert files(cache) == stored  # the uncached run writes no activations
    again = run("again", tail_cache=True, cache_memory_mb=0)
    assert files(cache) == stored  # every activation came from the cache: nothing rewritten or added

    modes = {d: json.loads((d / "run.json").read_text())["protocol"]["feature_cache"] for d in (cached, plain, again)}
    assert "activations at blocks.6" in modes[cached] and "in memory" in modes[cached]
    assert "activations at blocks.6" in modes[again] and "streamed from disk" in modes[again]
    assert "activations" not in modes[plain] and "offline copies (1 per image)" in modes[plain]

    (hc, pc, c), (hp, pp, p), (ha, _, a) = outputs(cached), outputs(plain), outputs(again)
    assert len(hc) == len(hp) == 3
    # measured: train_loss within 0.06%, probabilities within 0.007 (fp16 activations vs fp32 ones)
    np.testing.assert_allclose(hc["train_loss"], hp["train_loss"], rtol=0.02)
    np.testing.assert_allclose(c, p, atol=0.05)
    assert abs((pc["pred"] == pc["label"]).sum() - (pp["pred"] == pp["label"]).sum()) <= 1
    assert list(pc["path"]) == list(pp["path"]) and len(pc) == 15
    # the cached run read from disk in batches: the very same numbers as the first cached run
    np.testing.assert_array_equal(a, c)
    pd.testing.assert_frame_equal(ha.drop(columns="seconds"), hc.drop(columns="seconds"))

    # training moved the tail (and its BatchNorm statistics) and left the prefix exactly as loaded
    spec = get_backbone("efficientnet_lite0")
    start = build_backbone(spec, "efficientnet_lite0_packaged")[0].state_dict()
    tail = [k for k in start if k.startswith(("blocks.6.", "conv_head.", "bn2."))
            and not k.endswith("num_batches_tracked")]
    prefix = [k for k in start if not k.startswith(("blocks.6.", "conv_head.", "bn2."))
              and not k.endswith("num_batches_tracked")]
    assert tail and len(prefix) > len(tail) and any("running_mean" in k for k in prefix)
    for run_dir in (cached, plain):
        trained = load_classifier(run_dir)[0].backbone.state_dict()
        assert all(torch.equal(trained[k], start[k]) for k in prefix), run_dir.name
        assert all(not torch.equal(trained[k], start[k]) for k in tail), run_dir.name


def test_pooled_stages_run_reloads_and_reproduces_its_predictions(tmp_path, demo_data):
    from oncotransfer.data.images import decode_many, normalise
    from oncotransfer.data.manifest import resolve_data_path
    from oncotransfer.models.factory import load_classifier
    from oncotransfer.experiments.run import run_experiment
    common = dict(epochs=2)
    # a pool_stages 1 run first, in the same cache folder: the pooled features must not be served its entries
    one = run_experiment(demo_config(tmp_path, "one", {"freeze": "frozen"}, **common), data=demo_data,
                         report=False).run_dir
    three = run_experiment(demo_config(tmp_path, "three", {"freeze": "frozen", "pool_stages": 3}, **common),
                           data=demo_data, report=False).run_dir
    model, meta = load_classifier(three)
    assert model.pool_stages == 3 and model.num_features == 1792
    assert model.head.net[0].in_features == 1792
    assert load_classifier(one)[0].pool_stages == 1
    _, saved, probs = outputs(three)
    root = resolve_data_path("demo:osteosarcoma")
    x = decode_many([str(root / p) for p in saved["path"]], int(meta["preprocessing"]["size"]))[0]
    with torch.no_grad():
        got = model.probabilities(normalise(x, model.spec.mean, model.spec.std)).numpy()
    np.testing.assert_allclose(got, probs, atol=1e-4)
    assert not np.allclose(outputs(one)[2], probs, atol=1e-3)  # pooled features change the model
