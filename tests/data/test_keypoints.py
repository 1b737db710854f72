"""The keypoint check's shortcuts give the same verdicts as the exhaustive count (issue 21: evaluate --data's
overlap check was most of its time)."""
from __future__ import annotations

import numpy as np
from PIL import Image

from oncotransfer.data.demo import demo_path
from oncotransfer.data.keypoints import MIN_INLIERS, Keypoints, best_inliers, orb


def _images() -> list[Image.Image]:
    files = sorted(demo_path("osteosarcoma").rglob("*.jpg"))[:6]
    return [Image.open(f).convert("RGB") for f in files]


def test_early_stop_and_mask_keep_the_verdicts():
    imgs = _images()
    ref = Keypoints.stack([orb(im) for im in imgs[:4]])
    w, h = imgs[0].size
    queries = [imgs[0].crop((w // 10, h // 10, w, h)), imgs[1].transpose(Image.Transpose.FLIP_LEFT_RIGHT),
               imgs[4], imgs[5]]
    q = Keypoints.stack([orb(im) for im in queries])
    mirrored = Keypoints.stack([orb(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)) for im in queries])
    exact = best_inliers([q, mirrored], ref)
    fast = best_inliers([q, mirrored], ref, enough=MIN_INLIERS)
    assert (exact[:2] >= MIN_INLIERS).all() and (exact[2:] < MIN_INLIERS).all()  # two copies, two distinct tiles
    assert ((fast >= MIN_INLIERS) == (exact >= MIN_INLIERS)).all() and (fast <= exact).all()
    only = np.array([False, True, True, False])
    masked = best_inliers([q, mirrored], ref, only=only)
    assert masked.tolist() == [0, exact[1], exact[2], 0]
