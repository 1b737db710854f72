"""How well ``evaluate RUN --data`` names copies of the run's training images (issue 22), and how often it names
truly distinct images.

Data: busi-dev (../shared/data/busi-dev, the default) or a built-in demo set (``--data demo:busi``). Split: 5 folds
by duplicate group (sha256 or pHash within 4 bits: the grouping the splits and ``data inspect`` use), so no near-
duplicate group spans two folds. For each fold the other 4 folds are the "training images".

- Detection: ``--per-transform`` training images (sampled over the folds) are transformed (flips, quarter-turns,
  small rotations, crops, padding, brightness, contrast, JPEG, resizing, blur, noise), written to files and
  checked against their fold's training images; the share named overlapping, per transform, by the old check
  (byte hash + pHash within 4 bits, one orientation) and the new one (8 orientations + keypoints).
- False positives: every image, as the test fold's, against the other folds (truly distinct by construction:
  its duplicate group is not among them); plus its flipped and 20%-cropped copies (still distinct).
- Inliers: the quantiles of verified keypoint matches, own copies against distinct pairs: the MIN_INLIERS margin.
- Ground truth for "distinct": each image named as it is gets aligned onto its best match (the similarity transform
  of its keypoints) and the two correlated (NCC); >= SAME_SCAN_NCC is one scan re-cropped or shifted, which the
  pHash grouping missed, so not a false positive. The false-positive rate is over the rest.

Usage: PYTHONPATH=src python benchmarks/overlap.py [--data PATH] [--per-transform 60]
"""
from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
SAME_SCAN_NCC = 0.8
"""Correlation after alignment at or above which two images are one scan (re-encoded, re-cropped, shifted)."""


def _crop(frac: float, seed: int):
    rng = np.random.default_rng(seed)

    def f(im: Image.Image) -> Image.Image:  # an off-centre crop keeping (1 - frac) of each side
        w, h = im.size
        cw, ch = max(1, round(w * (1 - frac))), max(1, round(h * (1 - frac)))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return im.crop((x, y, x + cw, y + ch))
    return f


def _pad(px: int):
    def f(im: Image.Image) -> Image.Image:
        out = Image.new("RGB", (im.width + 2 * px, im.height + 2 * px))
        out.paste(im, (px, px))
        return out
    return f


def _noise(im: Image.Image) -> Image.Image:
    a = np.asarray(im, dtype=np.float32)
    a = a + np.random.default_rng(a.size).normal(0, 10, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


T = Image.Transpose
TRANSFORMS = {
    "hflip": lambda im: im.transpose(T.FLIP_LEFT_RIGHT),
    "vflip": lambda im: im.transpose(T.FLIP_TOP_BOTTOM),
    "rot90": lambda im: im.transpose(T.ROTATE_90),
    "rot180": lambda im: im.transpose(T.ROTATE_180),
    "rot270": lambda im: im.transpose(T.ROTATE_270),
    "rot5": lambda im: im.rotate(5, Image.BILINEAR),
    "rot10": lambda im: im.rotate(-10, Image.BILINEAR),
    "crop10": _crop(0.10, 1),
    "crop20": _crop(0.20, 2),
    "crop8px": lambda im: im.crop((8, 8, im.width - 8, im.height - 8)),
    "pad12": _pad(12),
    "bright30": lambda im: ImageEnhance.Brightness(im).enhance(1.3),
    "contrast": lambda im: ImageEnhance.Contrast(im).enhance(1.4),
    "jpeg70": lambda im: im,   # the JPEG re-encode happens when written (``write``)
    "resize0.5": lambda im: im.resize((max(1, im.width // 2), max(1, im.height // 2)), Image.BILINEAR),
    "blur": lambda im: im.filter(ImageFilter.GaussianBlur(2)),
    "noise": _noise,
    "hflip+crop10": lambda im: _crop(0.10, 3)(im.transpose(T.FLIP_LEFT_RIGHT)),
}
"""name -> PIL image -> transformed image (greyscale or colour as the source)."""


def write(img: Image.Image, name: str, dst: Path) -> Path:
    """The transformed image as a file: JPEG q=70 for jpeg70, lossless PNG otherwise."""
    out = TRANSFORMS[name](img.convert("RGB"))
    dst.parent.mkdir(parents=True, exist_ok=True)
    if name == "jpeg70":
        buf = io.BytesIO()
        out.save(buf, "JPEG", quality=70)
        dst = dst.with_suffix(".jpg")
        dst.write_bytes(buf.getvalue())
    else:
        dst = dst.with_suffix(".png")
        out.save(dst)
    return dst


def _folds(groups: np.ndarray, k: int = 5, seed: int = 0) -> np.ndarray:
    ids = np.unique(groups)
    fold_of = dict(zip(np.random.default_rng(seed).permutation(ids), np.arange(len(ids)) % k))
    return np.array([fold_of[g] for g in groups])


def same_scan(query: str, refs: list[str]) -> tuple[str, int, float]:
    """(best reference, its inliers, NCC of the query warped onto it): the photometric check that tells a re-cropped
    or shifted copy of one scan (NCC near 1 where the two overlap) from a distinct image whose keypoints happen to
    line up (NCC near 0). Independent of the keypoint count the detector thresholds, so it can judge it."""
    import cv2
    from oncotransfer.data.keypoints import _grey, orb, similarity
    from oncotransfer.data.readers import open_rgb
    query_img = open_rgb(query)
    gq, q = _grey(query_img), orb(query_img)
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
    best = (refs[0], -1, None, None)
    for r in refs:
        img = open_rgb(r)
        k, M = similarity(q, orb(img), matcher)
        if k > best[1]:
            best = (r, k, M, _grey(img))
    r, k, M, gr = best
    if M is None:
        return r, max(k, 0), 0.0
    warped = cv2.warpAffine(gq.astype(np.float32), M, (gr.shape[1], gr.shape[0]), borderValue=-1)
    ok = warped >= 0
    a, b = warped[ok], gr.astype(np.float32)[ok]
    if ok.sum() < 100 or a.std() == 0 or b.std() == 0:
        return r, k, 0.0
    return r, k, float(np.corrcoef(a, b)[0, 1])


def main() -> int:
    sys.path.insert(0, str(ROOT / "src"))
    from oncotransfer.data.keypoints import MIN_INLIERS, Keypoints, describe_files
    from oncotransfer.data.manifest import duplicate_groups, load_manifest, resolve_data_path
    from oncotransfer.data.overlap import NEAR_BITS, Reference, find_overlap, hamming_min
    from oncotransfer.data.readers import open_rgb

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "busi-dev"))
    ap.add_argument("--per-transform", type=int, default=60)
    args = ap.parse_args()
    t0 = time.time()
    m = load_manifest(str(resolve_data_path(args.data)), None)
    ref_all = describe_files(m.paths)
    ph = np.ascontiguousarray(ref_all.phashes[:, 0])
    groups = duplicate_groups(m.sha256, ph)
    fold = _folds(groups)
    n = len(m)
    print(f"{args.data}: {n} images, {len(np.unique(groups))} duplicate groups (sha256 or pHash <= {NEAR_BITS}), "
          f"5 folds by group; described in {time.time() - t0:.0f} s")

    def reference(f: int) -> Reference:
        idx = np.nonzero(fold != f)[0]
        kp = Keypoints.stack([ref_all.keypoints.image(i) for i in idx])
        return Reference({m.sha256[i] for i in idx}, ph[idx], len(idx), [], kp)
    refs = {f: reference(f) for f in range(5)}

    # False positives: each fold's images (and their flipped / cropped copies) against the other folds
    fp_rows, distinct_inliers, flagged = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("none", "hflip", "crop20"):
            named = 0
            for f in range(5):
                idx = np.nonzero(fold == f)[0]
                files = [m.paths[i] if name == "none" else
                         str(write(open_rgb(m.paths[i]), name, Path(tmp) / name / str(i))) for i in idx]
                q = describe_files(files, mirrored=True)
                ov = find_overlap(["-"] * len(idx), None, refs[f], q, exact_inliers=True)
                named += int(ov.mask.sum())
                if name == "none":
                    distinct_inliers += ov.inliers.tolist()
                    flagged += [(int(i), f) for i in idx[ov.mask]]
            fp_rows.append((name, named, n))

        # Detection: sampled training images, transformed, against the training images of their fold
        rng = np.random.default_rng(0)
        det_rows, own_inliers = [], {}
        for name in TRANSFORMS:
            f_of = rng.integers(0, 5, args.per_transform)
            picks = [int(rng.choice(np.nonzero(fold != f)[0])) for f in f_of]
            old = new = 0
            inl = []
            for f in range(5):
                sel = [p for p, ff in zip(picks, f_of) if ff == f]
                if not sel:
                    continue
                files = [str(write(open_rgb(m.paths[i]), name, Path(tmp) / name / f"{f}_{i}")) for i in sel]
                q = describe_files(files, mirrored=True)
                shas = [hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in files]
                old_near = hamming_min(q.phashes[:, 0], refs[f].phash) <= NEAR_BITS
                old += int((np.array([s in refs[f].sha256 for s in shas]) | old_near).sum())
                ov = find_overlap(shas, None, refs[f], q, exact_inliers=True)
                new += int(ov.mask.sum())
                inl += ov.inliers.tolist()
            det_rows.append((name, old, new, args.per_transform))
            own_inliers[name] = np.array(inl)

    print(f"\n## Detection: transformed training images named as overlapping ({args.per_transform} per transform)\n")
    print("| transform | before (hash + pHash) | now (8 orientations + keypoints) | inliers 5% / median |")
    print("|---|---|---|---|")
    for name, old, new, k in det_rows:
        q5, q50 = np.quantile(own_inliers[name], [0.05, 0.5])
        print(f"| {name} | {old}/{k} ({old / k:.0%}) | {new}/{k} ({new / k:.0%}) | {q5:.0f} / {q50:.0f} |")
    print(f"\n## False positives: truly distinct images named as overlapping (each image as its fold's test "
          f"image against the 4 other folds; its duplicate group is not among them)\n")
    print("| test images | named | rate |")
    print("|---|---|---|")
    for name, named, k in fp_rows:
        label = {"none": "as they are", "hflip": "flipped", "crop20": "cropped 20%"}[name]
        print(f"| {label} | {named}/{k} | {named / k:.1%} |")
    d = np.array(distinct_inliers)
    print(f"\nMost verified keypoint matches of a distinct image with any training image: max {d.max()}, 99th "
          f"percentile {np.quantile(d, 0.99):.0f}, median {np.median(d):.0f}; threshold MIN_INLIERS = {MIN_INLIERS}; "
          f"distinct images at or above 30 / 40 / 50: {(d >= 30).sum()} / {(d >= 40).sum()} / {(d >= 50).sum()} "
          f"of {len(d)}")
    # Which of those are one scan re-cropped or shifted (the pHash grouping missed them, so "distinct" by
    # construction is wrong for them), and which are truly distinct images the check names: NCC after alignment
    checked = [(m.relpath(i), *same_scan(m.paths[i], [m.paths[j] for j in np.nonzero(fold != f)[0]]))
               for i, f in flagged]
    scans = [c for c in checked if c[3] >= SAME_SCAN_NCC]
    false = [c for c in checked if c[3] < SAME_SCAN_NCC]
    truly = n - len(scans)
    print(f"\n## The images named as they are, checked photometrically (NCC of the query warped onto its best match; "
          f">= {SAME_SCAN_NCC}: the same scan)\n")
    print("| image | best match | inliers | NCC | verdict |")
    print("|---|---|---|---|---|")
    for q, r, k, c in sorted(checked):
        print(f"| {q} | {Path(r).parent.name}/{Path(r).name} | {k} | {c:.3f} | "
              f"{'same scan, re-cropped/shifted' if c >= SAME_SCAN_NCC else 'distinct: a false positive'} |")
    print(f"\nTruly distinct images (not the same scan as any image of the other folds): {truly}; named as "
          f"overlapping: {len(false)} ({len(false) / max(truly, 1):.1%}). Same scans the pHash <= {NEAR_BITS} "
          f"grouping misses (so the split holds them in two folds): {len(scans)}")
    print(f"\n{time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
