"""Near-duplicate matching that survives what augmentation does to an image: the pHash of its 8 flips and
quarter-turns, and ORB keypoints verified by a similarity transform (rotation, scale, shift: small rotations,
crops, padding, resizing), on the query and on its mirror image. Thresholds come from benchmarks/overlap.py."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SIDE = 256
"""Longest side of the greyscale image keypoints are found on: the same for every run, so one threshold fits
all (the model's own input size can be 64 px, too coarse for keypoints)."""
N_KEYPOINTS = 512
"""Keypoints kept per image: about 18 kB per training image in RUN/overlap_keypoints.npz. 256 left a 10-20% crop of
a small, low-texture image (the 128 px demo ultrasound) with 32-38 verified matches, under MIN_INLIERS; 512 gives
65-97 (runs that saved 256 still work: their copies keep fewer matches, well above the threshold on busi-dev)."""
MIN_INLIERS = 40
"""Keypoint matches consistent with one similarity transform at or above which an image is a copy of a training
image. benchmarks/overlap.py on busi-dev (5 folds by pHash-4 duplicate group, each image against the other
folds, 512 keypoints): 309 of 323 images reach at most 29 inliers with any other image (median 6); the other 14
reach 51-365, and all 14 are the same scan re-cropped or shifted (pHash 6-14 bits apart, which the pHash <= 4
grouping misses; the benchmark aligns each with its best match: correlation 0.957-0.996, against at most 0.35
for distinct images). Copies keep far more: 5th percentile 109 for 20% crops, 150 for 10% crops, 204 for 12 px
padding, 263 for 10-degree rotations, 149 for blur. 40 sits in the gap, nearer the distinct side."""
CANDIDATES = 6
"""Training images per query (the most keypoint votes, per orientation) that get the geometric check."""
VOTE_BITS = 48
"""Hamming distance (of 256 bits) under which a query keypoint votes for the training image holding its nearest
descriptor."""
KEYPOINTS_FILE = "overlap_keypoints.npz"


@dataclass
class Keypoints:
    """ORB keypoints of several images, stacked: image ``i`` owns rows ``offsets[i]:offsets[i + 1]``."""
    points: np.ndarray
    """float32 (K, 2) positions on the SIDE-px image."""
    desc: np.ndarray
    """uint8 (K, 32) ORB descriptors."""
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def image(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = self.offsets[i], self.offsets[i + 1]
        return self.points[s:e], self.desc[s:e]

    @classmethod
    def stack(cls, items: list[tuple[np.ndarray, np.ndarray]]) -> "Keypoints":
        sizes = [len(d) for _, d in items]
        pts = np.concatenate([p for p, _ in items]) if items else np.zeros((0, 2), np.float32)
        desc = np.concatenate([d for _, d in items]) if items else np.zeros((0, 32), np.uint8)
        return cls(pts.astype(np.float32), desc.astype(np.uint8), np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))


def _grey(img: Image.Image) -> np.ndarray:
    import cv2
    g = np.asarray(img.convert("L"))
    s = SIDE / max(g.shape)
    shape = (max(1, round(g.shape[1] * s)), max(1, round(g.shape[0] * s)))
    return cv2.resize(g, shape, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)


def orb(img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(positions float32 (K, 2), descriptors uint8 (K, 32)) of up to N_KEYPOINTS ORB keypoints."""
    import cv2
    kp, d = cv2.ORB_create(nfeatures=N_KEYPOINTS, fastThreshold=10).detectAndCompute(_grey(img), None)
    if d is None:
        return np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8)
    return np.array([k.pt for k in kp], np.float32).reshape(-1, 2), d


def dihedral_phashes(img: Image.Image) -> np.ndarray:
    """uint64 (8,): the pHash (``images.phash64``'s) of the image and of its 7 flips and quarter-turns. imagehash
    shrinks to 32x32 first; a flip commutes with that resize, so the 7 come from the small image, cheaply."""
    import imagehash
    small = img.convert("L").resize((32, 32), Image.Resampling.LANCZOS)
    T = Image.Transpose
    views = [small, small.transpose(T.FLIP_LEFT_RIGHT), small.transpose(T.FLIP_TOP_BOTTOM),
             small.transpose(T.ROTATE_90), small.transpose(T.ROTATE_180), small.transpose(T.ROTATE_270),
             small.transpose(T.TRANSPOSE), small.transpose(T.TRANSVERSE)]
    return np.array([int(str(imagehash.phash(v)), 16) for v in views], dtype=np.uint64)


@dataclass
class Described:
    """What the overlap check needs of a set of images, in input order; ``ok[i]`` False: unreadable."""
    ok: np.ndarray
    phashes: np.ndarray
    """uint64 (N, 8): dihedral pHashes (zeros where unreadable)."""
    keypoints: Keypoints
    mirrored: Keypoints | None
    """The same of each image's mirror image (queries only: ORB is rotation- but not mirror-invariant)."""


def describe_files(paths: list[str], mirrored: bool = False, us_region: bool = True, workers: int = 2) -> Described:
    """Decode each file with the model's decoding rule and describe it (keypoints, dihedral pHashes)."""
    import cv2

    from oncotransfer.data.images import decode_for_model
    cv2.setNumThreads(1)  # the thread pool already runs one image per core

    def one(p: str):
        try:
            img = decode_for_model(p, SIDE, us_region=us_region)[0]
        except Exception:  # noqa: BLE001 - an unreadable file was already reported by the scoring pass
            return None
        flip = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return dihedral_phashes(img), orb(img), (orb(flip) if mirrored else None)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        res = list(pool.map(one, paths))
    empty = (np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8))
    ok = np.array([r is not None for r in res], dtype=bool)
    ph = np.array([r[0] if r is not None else np.zeros(8, np.uint64) for r in res], dtype=np.uint64).reshape(-1, 8)
    kps = Keypoints.stack([r[1] if r is not None else empty for r in res])
    mir = Keypoints.stack([r[2] if r is not None else empty for r in res]) if mirrored else None
    return Described(ok, ph, kps, mir)


def save_keypoints(path: Path, index: np.ndarray, sha256: list[str], kp: Keypoints) -> None:
    """RUN/overlap_keypoints.npz: each training image's keypoints by its split.csv ``index`` (and sha256, so a
    resumed run can tell they still belong to the same images)."""
    from oncotransfer.io import atomic_write_bytes
    import io
    buf = io.BytesIO()
    np.savez_compressed(buf, index=np.asarray(index, np.int64), sha256=np.array(sha256, dtype="U64"),
                        points=kp.points.astype(np.float16), desc=kp.desc, offsets=kp.offsets)
    atomic_write_bytes(path, buf.getvalue())


def load_keypoints(path: Path) -> tuple[np.ndarray, list[str], Keypoints] | None:
    """(split indices, sha256, keypoints) from RUN/overlap_keypoints.npz; None when absent or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return (z["index"], [str(s) for s in z["sha256"]],
                    Keypoints(z["points"].astype(np.float32), z["desc"], z["offsets"]))
    except (OSError, KeyError, ValueError):
        return None


def similarity(q: tuple[np.ndarray, np.ndarray], r: tuple[np.ndarray, np.ndarray], matcher
               ) -> tuple[int, np.ndarray | None]:
    """(matches consistent with one rotation + uniform scale + shift, that 2x3 transform from ``q`` to ``r`` or
    None): Lowe's ratio test 0.8, then RANSAC with 5 px. ``q``, ``r``: (positions, descriptors)."""
    import cv2
    (pq, dq), (pr, dr) = q, r
    if len(dq) < 2 or len(dr) < 2:
        return 0, None
    good = [a for a, b in (m for m in matcher.knnMatch(dq, dr, k=2) if len(m) == 2) if a.distance < 0.8 * b.distance]
    if len(good) < 3:
        return 0, None
    a = pq[[g.queryIdx for g in good]]
    b = pr[[g.trainIdx for g in good]]
    M, inl = cv2.estimateAffinePartial2D(a, b, method=cv2.RANSAC, ransacReprojThreshold=5.0)
    return (int(inl.sum()), M) if inl is not None else (0, None)


def _inliers(q: tuple[np.ndarray, np.ndarray], r: tuple[np.ndarray, np.ndarray], matcher) -> int:
    return similarity(q, r, matcher)[0]


def best_inliers(queries: list[Keypoints], ref: Keypoints, enough: int | None = None,
                 only: np.ndarray | None = None) -> np.ndarray:
    """int (N,): for each query image (over its orientations, ``queries``: the images, their mirror images) the
    most verified matches with any reference image. Candidates first: every query keypoint votes for the
    reference image holding its nearest descriptor; only the CANDIDATES most voted-for are verified.
    ``enough``: stop verifying an image once it holds that many (its count is then at least ``enough``, not
    the most); ``only``: a mask of the images to check (the others stay 0)."""
    import cv2
    n = len(queries[0])
    out = np.zeros(n, dtype=int)
    todo = np.ones(n, dtype=bool) if only is None else np.asarray(only, dtype=bool)
    if len(ref) == 0 or len(ref.desc) == 0:
        return out
    owner = np.repeat(np.arange(len(ref)), np.diff(ref.offsets))
    matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
    # votes through an LSH index: brute force over every training descriptor costs ~0.1 s per query per 1,000
    # training images; a vote only needs most nearest neighbours, and the geometric check below is exact
    index = cv2.FlannBasedMatcher(dict(algorithm=6, table_number=6, key_size=12, multi_probe_level=1), dict(checks=64))
    index.add([ref.desc])
    index.train()
    for q in queries:
        for i in range(n):
            pts, desc = q.image(i)
            if len(desc) == 0 or not todo[i] or (enough is not None and out[i] >= enough):
                continue
            nearest = [m[0] for m in index.knnMatch(desc, k=1) if m and m[0].distance <= VOTE_BITS]
            if not nearest:
                continue
            votes = np.bincount(owner[[m.trainIdx for m in nearest]], minlength=len(ref))
            for j in np.argsort(-votes, kind="stable")[:CANDIDATES]:
                if votes[j] < 3:  # too few votes to hold MIN_INLIERS verified matches
                    break
                out[i] = max(out[i], _inliers((pts, desc), ref.image(int(j)), matcher))
                if enough is not None and out[i] >= enough:
                    break
    return out
