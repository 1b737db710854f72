"""Multistage chaining: the backbone is carried over, the head replaced; wrong checkpoints are clear errors."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from oncotransfer.config import validate
from oncotransfer.errors import WeightsError
from oncotransfer.models import create_classifier
from oncotransfer.config import HeadConfig
from oncotransfer.models.checkpoint import read_checkpoint
from oncotransfer.experiments.stages import run_config


def _images(root: Path, classes: list[str], per_class: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            base = np.zeros((48, 48, 3), np.uint8)
            base[..., k % 3] = 120 + 40 * k
            noise = rng.integers(0, 60, (48, 48, 3), dtype=np.uint8)
            Image.fromarray(base + noise).save(root / c / f"{c}_{i}.png")
    return root


def _cfg(tmp_path: Path, compare: bool = False, size2: int | None = None):
    a = _images(tmp_path / "a", ["x", "y", "z"], 8, 0)
    b = _images(tmp_path / "b", ["benign", "malignant"], 10, 1)
    return validate({
        "name": "ms", "output_dir": str(tmp_path / "runs"), "compare_direct": compare,
        "data": {"image_size": 64},
        "model": {"backbone": "efficientnet_lite0", "weights": "efficientnet_lite0_packaged"},
        "split": {"kind": "holdout", "test_size": 0.25, "group_by_patient": False, "allow_image_level_split": True},
        "train": {"epochs": 2, "batch_size": 8, "optimizer": "adagrad", "lr": 0.01, "cache_dir": str(tmp_path / "c"),
                  "num_workers": 1},
        "evaluate": {"bootstrap": 0},
        "stages": [
            {"name": "one", "data": {"path": str(a)}, "head": {"kind": "linear"}, "freeze": "last:1"},
            {"name": "two", "data": {"path": str(b), **({"image_size": size2} if size2 else {})}, "freeze": "frozen",
             "head": {"kind": "mlp", "hidden": [16, 8], "dropout": 0.2, "sigmoid": True},
             "train": {"epochs": 3}, "evaluate": {"positive_classes": ["malignant"]}},
        ]})


def test_stage_two_carries_stage_one_backbone_and_replaces_head(tmp_path):
    res = run_config(_cfg(tmp_path))
    s1, s2 = sorted(p for p in res.run_dir.iterdir() if p.is_dir() and p.name.startswith("stage"))
    w1, m1 = read_checkpoint(s1)
    w2, m2 = read_checkpoint(s2)
    back1 = {k: v for k, v in w1.items() if k.startswith("backbone.")}
    back2 = {k: v for k, v in w2.items() if k.startswith("backbone.")}
    assert back1.keys() == back2.keys()
    assert all(torch.equal(back1[k], back2[k]) for k in back1)  # frozen stage 2: identical after hand-over
    # stage 1 really trained the last block, so the carried backbone is not the ImageNet one
    imagenet = create_classifier("efficientnet_lite0", "efficientnet_lite0_packaged", HeadConfig(), 3).state_dict()
    assert any(not torch.equal(imagenet[k], back1[k]) for k in back1 if "running" not in k)
    assert m1["classes"] == ["x", "y", "z"] and m2["classes"] == ["benign", "malignant"]
    assert w1["head.net.0.weight"].shape[0] == 3 and w2["head.net.6.weight"].shape[0] == 1
    assert m2["config"]["model"]["weights"].startswith("run:")
    # the stage's own train keys win, the rest come from the top level
    assert m2["config"]["train"]["epochs"] == 3 and m2["config"]["train"]["optimizer"] == "adagrad"
    # each stage evaluates with its own positive classes (stage 1 has no 'malignant')
    assert m2["config"]["evaluate"] == {"positive_classes": ["malignant"], "bootstrap": 0, "calibrate": True,
                                        "calibration": "auto", "ece_bins": 15}
    assert m1["config"]["evaluate"]["positive_classes"] is None
    assert (res.run_dir / "report.html").is_file() and (res.run_dir / "checkpoint" / "meta.json").is_file()
    assert "64 px" in (res.run_dir / "report.md").read_text() and "⚠" not in (res.run_dir / "report.md").read_text()


def test_compare_direct_writes_side_by_side(tmp_path):
    res = run_config(_cfg(tmp_path, compare=True))
    html = (res.run_dir / "comparison.html").read_text()
    assert "multistage" in html and "direct" in html
    _, meta = read_checkpoint(res.run_dir / "direct")
    assert meta["config"]["model"]["weights"] == "efficientnet_lite0_packaged"
    assert "Did the detour help" in (res.run_dir / "report.md").read_text()


def test_report_warns_when_a_stage_changes_resolution(tmp_path):
    res = run_config(_cfg(tmp_path, size2=96))
    report = (res.run_dir / "report.md").read_text()
    assert "stage 2 runs at 96 px but stage 1 trained at 64 px" in report


def test_checkpoint_of_another_backbone_is_a_clear_error(tmp_path):
    cfg = _cfg(tmp_path)
    res = run_config(cfg.model_copy(update={"stages": cfg.stages[:1]}))
    with pytest.raises(WeightsError, match="efficientnet_lite0 backbone, but model.backbone is 'mobilenet_v2'"):
        create_classifier("mobilenet_v2", f"run:{res.run_dir}", HeadConfig(), 2)


def test_a_first_stage_that_cannot_start_leaves_no_folder(tmp_path):
    from oncotransfer.errors import DataError
    cfg = _cfg(tmp_path)
    bad = cfg.stages[0].model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"positive_classes": ["w"]})})
    with pytest.raises(DataError, match="evaluate.positive_classes: unknown class name"):
        run_config(cfg.model_copy(update={"stages": [bad, *cfg.stages[1:]]}))
    assert not any((tmp_path / "runs").iterdir())
