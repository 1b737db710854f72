"""data.images: the model's input tensor is the same whichever decoding path made it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from oncotransfer.data.images import decode_for_model, decode_many, decode_tensor, normalise


def _grey(rng: np.random.Generator, h: int = 97, w: int = 131) -> np.ndarray:
    # smooth structure plus noise: resampling weights matter (a flat image would hide a rounding difference)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 120 + 80 * np.sin(xx / 7.0) * np.cos(yy / 11.0)
    return np.clip(base + rng.normal(0, 25, (h, w)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("kind", ["L.png", "L.jpg", "I16.png", "P.png", "LA.png", "RGB.png", "1.png"])
@pytest.mark.parametrize("size", [64, 224])
def test_the_grey_shortcut_gives_the_rgb_decoding_s_tensor(tmp_path, kind, size):
    rng = np.random.default_rng(3)
    a = _grey(rng)
    mode, suffix = kind.split(".")
    img = {"L": lambda: Image.fromarray(a, "L"),
           "I16": lambda: Image.fromarray(a.astype(np.uint16) * 200 + 17),
           "P": lambda: Image.fromarray(a, "L").convert("P"),
           "LA": lambda: Image.fromarray(np.dstack([a, np.full_like(a, 200)]), "LA"),
           "RGB": lambda: Image.fromarray(np.dstack([a, a[::-1], 255 - a]), "RGB"),
           "1": lambda: Image.fromarray(a > 128)}[mode]()
    path = tmp_path / f"x.{suffix}"
    img.save(path)
    reference = decode_for_model(str(path), size)[1]
    shortcut = decode_tensor(str(path), size)[1]
    assert shortcut.dtype == torch.uint8 and shortcut.shape == (3, size, size)
    assert torch.equal(shortcut, reference)
    if mode == "L":
        assert decode_tensor(str(path), size)[0].mode == "L"  # the shortcut was taken, not the RGB path


def test_decode_many_hashes_grey_images_as_before(tmp_path):
    from oncotransfer.data.images import phash64
    rng = np.random.default_rng(5)
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        Image.fromarray(_grey(rng), "L").save(p)
        paths.append(str(p))
    stack, ok, failed, hashes = decode_many(paths, 64, phash=True)
    assert ok == [0, 1, 2] and not failed
    assert [int(h) for h in hashes] == [phash64(decode_for_model(p, 64)[0]) for p in paths]
    assert torch.equal(stack, torch.stack([decode_for_model(p, 64)[1] for p in paths]))


def test_normalise_matches_the_float_formula_bit_for_bit():
    batch = torch.randint(0, 256, (4, 3, 17, 19), dtype=torch.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = (batch.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    got = normalise(batch, mean, std)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    flipped = batch.flip(-1)  # a view with negative strides, as test-time augmentation passes
    assert torch.equal(normalise(flipped, mean, std), expected.flip(-1))
    assert torch.equal(normalise(batch.float() / 255, mean, std), expected)
