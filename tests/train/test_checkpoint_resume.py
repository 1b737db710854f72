"""Checkpoint round trip gives identical predictions; an interrupted run resumes to the same final metrics."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from oncotransfer.config import validate
from oncotransfer.data.images import normalise
from oncotransfer.models.factory import load_classifier
from oncotransfer.train.data import load_data
from oncotransfer.experiments.run import run_experiment
from oncotransfer.train.schedule import lr_factor


pytestmark = pytest.mark.usefixtures("one_thread")


def config(tmp_path: Path, **over):
    raw = {
        "name": "resume-test",
        "data": {"path": "demo:osteosarcoma", "image_size": 64},
        # image-level: a patient-grouped 2-fold split of these tiles trains one fold without Non-Viable-Tumor
        # (only Case-3 and Case-4 hold it), which the fold guard refuses
        "split": {"kind": "kfold", "folds": 2, "group_by_patient": False, "allow_image_level_split": True,
                  "val_size": 0.0, "seed": 0},
        "model": {"backbone": "efficientnet_lite0", "weights": "efficientnet_lite0_packaged",
                  "head": {"kind": "paper_dense", "hidden": [32]}, "freeze": "frozen"},
        "augment": {"mode": "offline", "copies": 1, "rotation": 20, "hflip": True},
        "train": {"optimizer": "adam", "lr": 0.003, "epochs": 5, "batch_size": 16, "seed": 3,
                  "cache_dir": str(tmp_path / "cache"), "num_workers": 1},
        "evaluate": {"bootstrap": 20},
        "output_dir": str(tmp_path / "runs"),
    }
    for key, value in over.items():
        section, name = key.split("__")
        raw[section][name] = value
    return validate(raw)


def comparable(run_dir: Path):
    hist = pd.read_csv(run_dir / "history.csv").drop(columns=["seconds"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    preds = pd.read_csv(run_dir / "predictions.csv")
    return hist, metrics, preds


def _strip_times(obj):
    if isinstance(obj, dict):
        return {k: _strip_times(v) for k, v in obj.items() if "second" not in k and "time" not in k}
    if isinstance(obj, list):
        return [_strip_times(v) for v in obj]
    return obj


class Interrupt:
    def __init__(self, fold: int, epoch: int):
        self.fold, self.epoch, self.seen = fold, epoch, []

    def __call__(self, fold: int, st) -> None:
        self.seen.append((fold, st.epoch))
        if fold == self.fold and st.epoch == self.epoch:
            raise KeyboardInterrupt


def interrupted_equals_uninterrupted(tmp_path: Path, cfg) -> pd.DataFrame:
    """Returns the uninterrupted run's history (every epoch of every fold, ``seconds`` dropped)."""
    full = run_experiment(cfg, tmp_path / "full")
    stop = Interrupt(0, 2)
    with pytest.raises(KeyboardInterrupt) as interrupted:
        run_experiment(cfg, tmp_path / "cut", on_epoch_end=stop)
    assert stop.seen[-1] == (0, 2)
    assert interrupted.value.run_dir == tmp_path / "cut"   # the CLI prints it in its --resume hint
    assert not (tmp_path / "cut" / "metrics.json").exists()
    resumed = run_experiment(run_dir=tmp_path / "cut", resume=True)
    h1, m1, p1 = comparable(full.run_dir)
    h2, m2, p2 = comparable(resumed.run_dir)
    assert len(h1) == cfg.train.epochs * 2          # every epoch of both folds is in the history once
    pd.testing.assert_frame_equal(h1, h2)
    pd.testing.assert_frame_equal(p1, p2)
    assert _strip_times(m1) == _strip_times(m2)
    assert full.accuracy == resumed.accuracy
    return h1


def test_checkpoint_round_trip_identical_probabilities(tmp_path):
    cfg = config(tmp_path, train__epochs=3)
    res = run_experiment(cfg, tmp_path / "run")
    model, meta = load_classifier(res.run_dir)
    assert meta["classes"] == res.classes and meta["preprocessing"]["size"] == 64
    data = load_data(cfg.data, 64, 1, phash=False)
    fold0 = pd.read_csv(res.run_dir / "predictions.csv").query("fold == 0")
    idx = [data.manifest.relpath(i) for i in range(len(data.manifest))]
    rows = [idx.index(p) for p in fold0["path"]]
    x = normalise(data.images[rows], model.spec.mean, model.spec.std)
    with torch.inference_mode():
        probs = model.probabilities(x).numpy()
    saved = fold0[[f"prob_{c}" for c in res.classes]].to_numpy()
    assert probs.shape == saved.shape
    # the run evaluated fold 0 with the same weights (cached features, fp32): same numbers
    assert abs(probs - saved).max() < 1e-5
    # and a second load gives bit-identical output
    model2, _ = load_classifier(res.run_dir)
    with torch.inference_mode():
        assert torch.equal(model2.probabilities(x), model.probabilities(x))


def test_resume_frozen_reaches_identical_metrics(tmp_path):
    interrupted_equals_uninterrupted(tmp_path, config(tmp_path))


def test_resume_finetune_without_cache(tmp_path):
    cfg = config(tmp_path, model__freeze="finetune", train__feature_cache=False, data__image_size=32,
                 train__epochs=3, train__lr=0.0005, augment__mode="online")
    interrupted_equals_uninterrupted(tmp_path, cfg)


def _steps_per_epoch(run_dir: Path, fold: int = 0) -> int:
    return json.loads((run_dir / "state" / f"fold{fold}.json").read_text())["schedule"]["steps_per_epoch"]


@pytest.mark.parametrize("schedule", [
    dict(train__schedule="cosine", train__warmup_epochs=1.5, train__min_lr_ratio=0.1, train__label_smoothing=0.1),
    dict(train__schedule="onecycle", train__warmup_epochs=2, train__lr=0.01)])
def test_resume_with_a_per_batch_schedule(tmp_path, schedule):
    cfg = config(tmp_path, **schedule)
    hist = interrupted_equals_uninterrupted(tmp_path, cfg)
    # the history's lr is the schedule's at each epoch's first batch: a pure function of the step count
    t, spe = cfg.train, _steps_per_epoch(tmp_path / "full")
    want = [t.lr * lr_factor(t.schedule, e * spe, t.warmup_epochs * spe, t.epochs * spe, t.min_lr_ratio)
            for e in range(t.epochs)]
    assert hist.query("fold == 0")["lr"].tolist() == pytest.approx(want, rel=1e-12)
    assert len(set(want)) == t.epochs


def test_resume_with_plateau(tmp_path):
    # at this lr, fold 0's epoch 3 (the first after the cut) is worse than epoch 2's best loss: a resume that
    # lost the plateau's state (best = inf again) would not halve the lr there
    cfg = config(tmp_path, train__schedule="plateau", train__plateau_patience=0, train__lr=0.01)
    hist = interrupted_equals_uninterrupted(tmp_path, cfg)
    for _, h in hist.groupby("fold"):
        # torch's rule, replayed on the validation losses: patience 0 halves after any epoch that does not
        # improve the best loss by 1e-4 relative
        lr, best, want = cfg.train.lr, float("inf"), []
        for loss in h["val_loss"]:
            want.append(lr)
            if loss < best * (1 - 1e-4):
                best = loss
            else:
                lr *= 0.5
        assert h["lr"].tolist() == pytest.approx(want, rel=1e-12)
    assert hist["lr"].min() < cfg.train.lr                  # the plateau did cut the lr in this run


def test_resume_discriminative_lr_with_cosine(tmp_path):
    cfg = config(tmp_path, model__freeze="last:1", train__feature_cache=False, data__image_size=32,
                 train__epochs=3, train__lr=0.001, augment__mode="online", train__schedule="cosine",
                 train__warmup_epochs=0.5, train__backbone_lr_mult=0.1)
    interrupted_equals_uninterrupted(tmp_path, cfg)
    groups = json.loads((tmp_path / "full" / "state" / "fold0.json").read_text())["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [0.001, pytest.approx(0.0001)]   # head, then backbone
    assert groups[1]["lr"] == pytest.approx(groups[0]["lr"] * 0.1)
