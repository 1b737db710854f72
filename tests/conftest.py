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
    from oncotransfer.train.experiment import run_experiment
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
