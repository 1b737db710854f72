"""Keras-ImageDataGenerator semantics of the batched augmenter, checked pixel by pixel on small images."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from oncotransfer.config import AugmentConfig
from oncotransfer.data.augment import (AugParams, Augmenter, _affine_grid, augment_views, describe, view_seed,
                                       zoom_range)


def params(n: int = 1, **kw) -> AugParams:
    base = AugParams.identity(n)
    fields = {k: getattr(base, k) for k in base.__dataclass_fields__}
    fields.update({k: np.broadcast_to(np.asarray(v), (n,)).copy() for k, v in kw.items()})
    return AugParams(**fields)


def aug(**kw) -> Augmenter:
    """A non-identity augmenter, so ``apply`` resamples whatever explicit params it is given."""
    kw.setdefault("rotation", 1.0)
    return Augmenter(AugmentConfig(mode="online", **kw))


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def centred_square(size: int = 64, side: int = 20) -> torch.Tensor:
    x = torch.zeros(1, 1, size, size)
    lo = (size - side) // 2
    x[..., lo:lo + side, lo:lo + side] = 1.0
    return x


def extent(mask_line: torch.Tensor) -> int:
    return int((mask_line > 0.5).sum())


# --- sampling -----------------------------------------------------------------------------------------------

def test_zoom_range_keras_and_clamped():
    assert zoom_range(1.5, "keras") == (-0.5, 2.5)
    assert zoom_range(1.5, "clamped") == (0.25, 2.5)
    assert zoom_range(0.2, "clamped") == pytest.approx((0.8, 1.2))
    assert zoom_range(0.0, "keras") == (1.0, 1.0)
    with pytest.raises(ValueError):
        zoom_range(0.5, "bogus")  # type: ignore[arg-type]


def test_sampled_ranges_are_keras_uniforms_and_span_the_range():
    a = Augmenter(AugmentConfig(mode="online", rotation=30, zoom=1.5, shift=0.2, brightness=0.3))
    p = a.sample(4000, np.random.default_rng(0))
    for arr, lo, hi in [(p.theta_deg, -30, 30), (p.zx, 0.25, 2.5), (p.zy, 0.25, 2.5),
                        (p.tx, -0.2, 0.2), (p.ty, -0.2, 0.2), (p.brightness, 0.7, 1.3)]:
        assert arr.min() >= lo and arr.max() <= hi
        assert arr.min() < lo + 0.03 * (hi - lo) and arr.max() > hi - 0.03 * (hi - lo)
    assert not p.hflip.any() and not p.vflip.any()
    assert abs(np.corrcoef(p.zx, p.zy)[0, 1]) < 0.05  # zx, zy independent, as in Keras


def test_keras_zoom_reaches_negative_scales_but_never_zero():
    p = Augmenter(AugmentConfig(mode="online", zoom=1.5, zoom_mode="keras")).sample(4000, np.random.default_rng(1))
    assert p.zx.min() < -0.45 and p.zx.max() > 2.45 and p.zx.min() >= -0.5

    class Zeros:  # a generator stub that lands exactly on zoom 1 - z = 0
        def random(self, shape):
            return np.zeros(shape)
    z = Augmenter(AugmentConfig(mode="online", zoom=1.0, zoom_mode="keras")).sample(3, Zeros())
    assert np.all(z.zx == 1e-3) and np.all(z.zy == 1e-3)


@pytest.mark.parametrize("cfg_flag,field", [("hflip", "hflip"), ("vflip", "vflip")])
def test_flip_probability_is_one_half(cfg_flag, field):
    p = Augmenter(AugmentConfig(mode="online", **{cfg_flag: True})).sample(4000, np.random.default_rng(2))
    assert 0.46 < getattr(p, field).mean() < 0.54


def test_sample_n_equals_n_single_samples_and_ranges_do_not_shift_each_other():
    a = Augmenter(AugmentConfig(mode="online", rotation=30, zoom=0.5))
    many = a.sample(5, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    one_by_one = AugParams.concat([a.sample(1, rng) for _ in range(5)])
    np.testing.assert_array_equal(many.theta_deg, one_by_one.theta_deg)
    np.testing.assert_array_equal(many.zx, one_by_one.zx)
    with_bright = Augmenter(AugmentConfig(mode="online", rotation=30, zoom=0.5, brightness=0.2))
    np.testing.assert_array_equal(with_bright.sample(5, np.random.default_rng(3)).theta_deg, many.theta_deg)


# --- geometry -----------------------------------------------------------------------------------------------

def test_matrices_identity_and_flip():
    m = Augmenter.matrices(params(2, hflip=[False, True]), (10, 20))
    assert m.shape == (2, 2, 3) and m.dtype == torch.float32
    torch.testing.assert_close(m[0], torch.tensor([[1.0, 0, 0], [0, 1, 0]]))
    torch.testing.assert_close(m[1], torch.tensor([[-1.0, 0, 0], [0, 1, 0]]))


def test_separable_grid_matches_affine_grid():
    theta = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(_affine_grid(theta, 7, 11),
                               F.affine_grid(theta, [3, 1, 7, 11], align_corners=False), atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [15, 16])
def test_rotation_90_is_clockwise_like_keras(size):
    # Keras: positive theta turns the content clockwise on screen, i.e. rot90 with k=-1.
    x = rand(2, 3, size, size)
    out = aug().apply(x, params(2, theta_deg=[90.0, -90.0]))
    torch.testing.assert_close(out[0], torch.rot90(x[0], k=-1, dims=(-2, -1)), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], torch.rot90(x[1], k=1, dims=(-2, -1)), atol=1e-5, rtol=0)


def test_rotation_is_a_true_rotation_on_non_square_images():
    x = rand(1, 2, 12, 20)
    out = aug().apply(x, params(theta_deg=90.0))
    expect = torch.rot90(x, k=-1, dims=(-2, -1))  # (20, 12): the centred 12x12 block overlaps ours
    torch.testing.assert_close(out[..., :, 4:16], expect[..., 4:16, :], atol=1e-5, rtol=0)


def test_matches_a_scipy_transcription_of_keras_apply_affine_transform():
    ndimage = pytest.importorskip("scipy.ndimage")
    h, w = 20, 28
    x = rand(1, 1, h, w, seed=5)
    theta, tx, ty, zx, zy = 17.0, 0.1, -0.05, 0.8, 1.3
    # Keras works in (row, col): its tx/zx are our vertical ty/zy. Centre: the true pixel centre (see module doc).
    t = np.deg2rad(theta)
    m = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    m = m @ np.array([[1, 0, ty * h], [0, 1, tx * w], [0, 0, 1]]) @ np.diag([zy, zx, 1.0])
    o = np.array([(h - 1) / 2, (w - 1) / 2])
    off, rst = np.eye(3), np.eye(3)
    off[:2, 2], rst[:2, 2] = o, -o
    m = off @ m @ rst
    ref = ndimage.affine_transform(x[0, 0].double().numpy(), m[:2, :2], m[:2, 2], order=1, mode="nearest")
    ref = np.flip(ref, axis=1)  # Keras flips after the affine
    out = aug().apply(x, params(theta_deg=theta, tx=tx, ty=ty, zx=zx, zy=zy, hflip=True))
    np.testing.assert_allclose(out[0, 0].numpy(), ref, atol=1e-5)


def test_hflip_and_vflip_are_exact_and_not_resampled():
    x = rand(3, 3, 9, 13)
    out = aug().apply(x, params(3, hflip=[True, False, True], vflip=[False, True, True]))
    assert torch.equal(out[0], torch.flip(x[0], dims=[-1]))
    assert torch.equal(out[1], torch.flip(x[1], dims=[-2]))
    assert torch.equal(out[2], torch.flip(x[2], dims=[-2, -1]))


def test_flip_is_applied_after_the_affine():
    x = rand(1, 1, 16, 24)
    a = aug()
    rotated = a.apply(x, params(theta_deg=20.0, tx=0.1))
    both = a.apply(x, params(theta_deg=20.0, tx=0.1, hflip=True))
    torch.testing.assert_close(both, torch.flip(rotated, dims=[-1]), atol=1e-5, rtol=0)


def test_zoom_below_one_magnifies_and_above_one_shrinks():
    x = centred_square(64, 20)
    a = aug(fill="constant")
    big = a.apply(x, params(zx=0.5, zy=0.5))
    small = a.apply(x, params(zx=2.0, zy=2.0))
    wide = a.apply(x, params(zx=0.5, zy=1.0))  # zx is horizontal
    assert extent(big[0, 0, 32]) == 40 and extent(big[0, 0, :, 32]) == 40
    assert extent(small[0, 0, 32]) == 10 and extent(small[0, 0, :, 32]) == 10
    assert extent(wide[0, 0, 32]) == 40 and extent(wide[0, 0, :, 32]) == 20


def test_keras_negative_zoom_mirrors():
    x = rand(1, 2, 12, 12)
    a = aug(zoom=1.5, zoom_mode="keras")
    torch.testing.assert_close(a.apply(x, params(zx=-1.0)), torch.flip(x, dims=[-1]), atol=1e-5, rtol=0)
    torch.testing.assert_close(a.apply(x, params(zx=-1.0, zy=-1.0)), torch.flip(x, dims=[-2, -1]),
                               atol=1e-5, rtol=0)
    mirrored_zoom = a.apply(x, params(zx=-0.5, zy=0.5))
    torch.testing.assert_close(mirrored_zoom, torch.flip(a.apply(x, params(zx=0.5, zy=0.5)), dims=[-1]),
                               atol=1e-5, rtol=0)


def test_positive_shift_moves_content_left_and_up_by_the_fraction():
    x = torch.zeros(1, 1, 32, 64)
    x[0, 0, 16, 40] = 1.0
    a = aug(fill="constant")
    out = a.apply(x, params(tx=0.25))  # 64 / 4 = 16 px
    assert out[0, 0, 16, 24] == pytest.approx(1.0, abs=1e-5) and out.sum() == pytest.approx(1.0, abs=1e-4)
    out = a.apply(x, params(ty=0.25))  # 32 / 4 = 8 px
    assert out[0, 0, 8, 40] == pytest.approx(1.0, abs=1e-5)


def test_fill_modes_after_a_shift():
    x = rand(1, 2, 8, 16)
    p = params(tx=0.25)  # output column c samples input column c + 4
    interior = {f: aug(fill=f).apply(x, p) for f in ("nearest", "constant", "reflect")}
    for out in interior.values():
        torch.testing.assert_close(out[..., :12], x[..., 4:], atol=1e-5, rtol=0)
    torch.testing.assert_close(interior["nearest"][..., 12:], x[..., 15:16].expand(-1, -1, -1, 4), atol=1e-5, rtol=0)
    assert torch.all(interior["constant"][..., 12:] == 0)
    torch.testing.assert_close(interior["reflect"][..., 12:], torch.flip(x[..., 12:], dims=[-1]), atol=1e-5, rtol=0)


def test_fill_modes_after_a_shrink():
    x = rand(1, 3, 16, 16) * 0.9 + 0.1  # no zero pixels
    p = params(zx=2.0, zy=2.0)  # output pixels 0..3 (and 12..15) map outside the input
    near = aug(fill="nearest").apply(x, p)
    const = aug(fill="constant").apply(x, p)
    for r, c in [(0, 0), (0, -1), (-1, 0), (-1, -1)]:
        corner = x[..., r, c][..., None, None]
        rs = slice(0, 4) if r == 0 else slice(12, 16)
        cs = slice(0, 4) if c == 0 else slice(12, 16)
        torch.testing.assert_close(near[..., rs, cs], corner.expand(-1, -1, 4, 4), atol=1e-6, rtol=0)
    ring = torch.ones(16, 16, dtype=torch.bool)
    ring[4:12, 4:12] = False
    assert torch.all(const[..., ring] == 0) and torch.all(const[..., 4:12, 4:12] > 0)


def test_brightness_multiplies_and_clips():
    x = torch.tensor([0.2, 0.5, 0.8]).view(1, 1, 1, 3)
    out = aug(brightness=0.5).apply(x, params(brightness=1.5))
    torch.testing.assert_close(out.flatten(), torch.tensor([0.3, 0.75, 1.0]))


# --- identity, dtypes, determinism --------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [AugmentConfig(), AugmentConfig(mode="none", rotation=30, hflip=True),
                                 AugmentConfig(mode="offline", copies=2)])
def test_identity_config_returns_input_untouched(cfg):
    a = Augmenter(cfg)
    x = rand(2, 3, 8, 8)
    assert a.identity
    assert a(x, 0) is x and a.apply(x, a.sample(2, 0)) is x
    assert augment_views(x, ["a", "b"], a, 0, 1) is x
    assert not aug().identity


def test_identity_params_do_not_blur():
    x = rand(2, 3, 8, 8)
    assert torch.equal(aug().apply(x, params(2)), x)


def test_uint8_in_uint8_out():
    x = (rand(2, 3, 10, 12) * 255).to(torch.uint8)
    a = aug()
    assert torch.equal(a.apply(x, params(2, hflip=True)), torch.flip(x, dims=[-1]))
    p = params(2, theta_deg=25.0, zx=0.8)
    out = a.apply(x, p)
    assert out.dtype == torch.uint8
    ref = a.apply(x.float() / 255, p) * 255
    assert (out.float() - ref).abs().max() <= 0.5 + 1e-3


def test_rejects_wrong_shapes():
    with pytest.raises(ValueError):
        aug().apply(rand(3, 8, 8), params(3))
    with pytest.raises(ValueError):
        aug().apply(rand(2, 3, 8, 8), params(3))


def test_same_seed_same_output():
    cfg = AugmentConfig(mode="online", rotation=30, hflip=True, zoom=0.5, shift=0.1, seed=7)
    x = rand(4, 3, 12, 12)
    assert torch.equal(Augmenter(cfg)(x, 11), Augmenter(cfg)(x, 11))
    assert not torch.equal(Augmenter(cfg)(x, 11), Augmenter(cfg)(x, 12))
    a, b = Augmenter(cfg), Augmenter(cfg)  # own streams seeded from cfg.seed
    assert torch.equal(a(x), b(x)) and torch.equal(a(x), b(x))


def test_view_seed_is_stable_and_distinct():
    assert view_seed(0, "patient1/img001.png", 0) == 9120120834218376451
    seeds = {view_seed(b, k, v) for b in (0, 1) for k in ("a", "b", "a/b") for v in range(3)}
    assert len(seeds) == 18 and all(0 <= s < 2**63 for s in seeds)
    code = "from oncotransfer.data.augment import view_seed; print(view_seed(0, 'patient1/img001.png', 0))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123"})
    assert int(other.stdout) == 9120120834218376451


def test_augment_views_do_not_depend_on_batch_company():
    a = Augmenter(AugmentConfig(mode="offline", copies=3, rotation=30, hflip=True, zoom=1.5))
    x = rand(3, 3, 12, 12)
    full = augment_views(x, ["a", "b", "c"], a, base_seed=5, view=1)
    alone = augment_views(x[1:2], ["b"], a, base_seed=5, view=1)
    shuffled = augment_views(x[[2, 1]], ["c", "b"], a, base_seed=5, view=1)
    torch.testing.assert_close(full[1:2], alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(full[[2, 1]], shuffled, atol=1e-6, rtol=0)
    assert not torch.equal(full, augment_views(x, ["a", "b", "c"], a, base_seed=5, view=2))


def test_describe():
    cfg = AugmentConfig(mode="offline", copies=3, rotation=30, hflip=True, zoom=1.5)
    assert describe(cfg) == ("offline, 3 copies: rotation ±30°, horizontal flip, "
                             "zoom 1±1.5 (clamped to [0.25, 2.5]), fill nearest")
    keras = AugmentConfig(mode="online", zoom=1.5, zoom_mode="keras", shift=0.1, fill="reflect")
    assert describe(keras) == "online: zoom 1±1.5 (keras range [-0.5, 2.5]), shift ±10%, fill reflect"
    assert describe(AugmentConfig()) == "none"


# --- property ------------------------------------------------------------------------------------------------

configs = st.builds(
    AugmentConfig, mode=st.sampled_from(["none", "online", "offline"]), copies=st.integers(1, 5),
    rotation=st.floats(0, 180), hflip=st.booleans(), vflip=st.booleans(), zoom=st.floats(0, 3),
    zoom_mode=st.sampled_from(["clamped", "keras"]), shift=st.floats(0, 0.99), brightness=st.floats(0, 0.99),
    fill=st.sampled_from(["nearest", "constant", "reflect"]), seed=st.integers(0, 2**32 - 1))


@settings(max_examples=60, deadline=None)
@given(cfg=configs, n=st.integers(1, 3), c=st.sampled_from([1, 3]), h=st.integers(3, 14), w=st.integers(3, 14),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.uint8]), seed=st.integers(0, 2**16))
def test_outputs_keep_shape_dtype_and_range(cfg, n, c, h, w, dtype, seed):
    x = rand(n, c, h, w, seed=seed)
    x = (x * 255).to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)
    out = Augmenter(cfg)(x, np.random.default_rng(seed))
    assert out.shape == x.shape and out.dtype == x.dtype
    f = out.double()
    assert not torch.isnan(f).any()
    top = 255 if dtype == torch.uint8 else 1 + 1e-6  # bilinear weights sum to 1 up to float rounding
    assert f.min() >= 0 and f.max() <= top
