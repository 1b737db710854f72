"""Shared fixtures."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))  # test helpers (synthetic) importable under --import-mode=importlib


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A real but tiny run: frozen offline EfficientNet-Lite0 on the demo osteosarcoma tiles, 128 px, 3 epochs."""
    from oncotransfer.config import validate
    from oncotransfer.experiments.run import run_experiment
    tmp = tmp_path_factory.mktemp("tiny_run")
    cfg = validate({
        "name": "tiny", "output_dir": str(tmp / "runs"),
        "data": {"path": "demo:osteosarcoma", "image_size": 128},
        "split": {"kind": "holdout", "allow_image_level_split": True, "group_by_patient": False},
        "model": {"backbone": "efficientnet_lite0", "weights": "efficientnet_lite0_packaged", "freeze": "frozen"},
        "train": {"epochs": 3, "cache_dir": str(tmp / "cache"), "num_workers": 1},
        "evaluate": {"bootstrap": 0},
    }, "tiny_run fixture")
    return run_experiment(cfg, report=False).run_dir


@pytest.fixture
def one_thread():
    """The CI box has 2 cores shared by several jobs: one thread is faster there than two fighting."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def kfold_run(tmp_path_factory):
    """A real tiny 3-fold run with an inner validation subset per fold (so temperatures are fitted): frozen
    offline Lite0 on the demo tiles at 64 px, 3 epochs, fp32 PyTorch features. Returns (run_dir, calls),
    ``calls`` being the (logits, labels) that ``fit_temperature`` received, one per fold."""
    from oncotransfer.config import validate
    from oncotransfer.train import temperature as calibration
    from oncotransfer.experiments.run import run_experiment
    tmp = tmp_path_factory.mktemp("kfold_run")
    cfg = validate({
        "name": "kfold", "output_dir": str(tmp / "runs"),
        "data": {"path": "demo:osteosarcoma", "image_size": 64},
        "split": {"kind": "kfold", "folds": 3, "val_size": 0.25, "allow_image_level_split": True,
                  "group_by_patient": False},
        "model": {"backbone": "efficientnet_lite0", "weights": "efficientnet_lite0_packaged", "freeze": "frozen"},
        "train": {"epochs": 3, "cache_dir": str(tmp / "cache"), "num_workers": 1, "feature_engine": "torch",
                  "fast_cpu": False},
        "evaluate": {"bootstrap": 0},
    }, "kfold_run fixture")
    calls, real = [], calibration.fit_temperature

    def recording(logits, y, sigmoid):
        calls.append((logits.copy(), y.copy()))
        return real(logits, y, sigmoid)
    calibration.fit_temperature = recording
    try:
        run_dir = run_experiment(cfg).run_dir
    finally:
        calibration.fit_temperature = real
    return run_dir, calls


@pytest.fixture
def run_copy(kfold_run, tmp_path):
    """A private copy of the k-fold run, for tests that write into it (exports, stale files)."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(kfold_run[0], run)
    return run
