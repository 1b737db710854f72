"""Synthetic image sets and tiny grid files for tests (tests/conftest.py puts this folder on sys.path)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
import yaml

TWO = {"a": (210, 60, 60), "b": (60, 90, 210)}
THREE = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (50, 60, 210)}


def colour_images(root: Path, colours: dict[str, tuple[int, int, int]] = TWO, per_class: int = 6, size: int = 40,
                  noise: float = 15.0, seed: int = 1, stripes: bool = False, name: str = "{c}{i}.png") -> Path:
    """One flat colour per class plus Gaussian noise (and, with ``stripes``, a per-image stripe texture), so
    classes are separable and no two images are identical. Deterministic for a given ``seed``."""
    rng = np.random.default_rng(seed)
    for c, rgb in colours.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = np.tile(np.array(rgb, np.float32), (size, size, 1))
            if stripes:
                a[:, :: 2 + (i % 3)] *= 0.6
            a += rng.normal(0, noise, a.shape)
            Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(root / c / name.format(c=c, i=i))
    return root


def tiny_grid(tmp: Path, grid: dict, trials: int = 2, name: str = "tiny", **extra) -> Path:
    """A grid file over ``tmp/img`` (make it with ``colour_images``): random-weight frozen Lite0 at 32 px,
    2 epochs, so a run takes about a second."""
    base = {"name": "g", "data": {"path": str(tmp / "img"), "image_size": 32},
            "split": {"kind": "holdout", "test_size": 0.25, "val_size": 0.0, "group_by_patient": False,
                      "group_duplicates": False, "allow_image_level_split": True},
            "model": {"backbone": "efficientnet_lite0", "weights": "none", "freeze": "frozen"},
            "train": {"epochs": 2, "batch_size": 4, "seed": 0, "feature_engine": "torch",
                      "cache_dir": str(tmp / "cache"), "num_workers": 0},
            "evaluate": {"bootstrap": 0}}
    path = tmp / "grid.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": base, "grid": grid, "trials": trials,
                                    "output_dir": str(tmp / "out"), **extra}))
    return path


def randomise_bn(model) -> None:
    """Non-trivial BatchNorm statistics, so frozen (eval-mode) BatchNorm is really exercised and an eval-mode
    comparison is not one of identity normalisations."""
    import torch
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
