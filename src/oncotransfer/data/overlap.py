"""Overlap of an external set with a run's own training images: byte sha256, the pHash of the query's 8 flips and
quarter-turns against the training pHashes (the splits' rule), and ORB keypoints verified by a similarity
transform (small rotations, crops, padding, resizing; ``data.keypoints``). split.csv keeps both hashes and
RUN/overlap_keypoints.npz the keypoints, so the check needs no access to the training images later."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from oncotransfer.data.checks import skipped_summary
from oncotransfer.data.keypoints import (KEYPOINTS_FILE, MIN_INLIERS, Described, Keypoints, best_inliers,
                                         describe_files, load_keypoints, save_keypoints)
from oncotransfer.data.manifest import Manifest
from oncotransfer.io import read_csv

NEAR_BITS = 4
"""Hamming distance of 64-bit pHashes at or below which two images count as near-identical: the threshold the
splits group duplicates by (``duplicate_groups``' ``max_distance``)."""


def split_frame(split, manifest: Manifest, phashes: np.ndarray | None) -> pd.DataFrame:
    """``split.to_frame`` plus each image's sha256 and (when computed) pHash as 16 hex digits."""
    df = split.to_frame(manifest)
    idx = df["index"].to_numpy(dtype=int)
    df["sha256"] = [manifest.sha256[i] for i in idx]
    if phashes is not None:
        df["phash"] = [f"{int(phashes[i]):016x}" for i in idx]
    return df


def data_warning_lines(warnings: list[str], skipped: dict[str, str], full_list: Path) -> list[str]:
    """Terminal lines for a run's data warnings: skipped files as one counted line, the rest as they are."""
    lines = [w if w.startswith("warning") else f"warning: {w}" for w in warnings
             if not w.startswith("skipped unreadable image:")]
    line = skipped_summary(skipped, str(full_list))
    return ([line] if line else []) + lines


def hamming_min(a: np.ndarray, b: np.ndarray, chunk: int = 512) -> np.ndarray:
    """For each uint64 hash in ``a`` the smallest Hamming distance to any hash in ``b`` (65 when ``b`` is empty)."""
    a, b = np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64)
    out = np.full(len(a), 65, dtype=int)
    if len(b) == 0:
        return out
    for s in range(0, len(a), chunk):
        x = a[s:s + chunk, None] ^ b[None, :]
        bits = np.unpackbits(x.view(np.uint8).reshape(x.shape[0], x.shape[1], 8), axis=2).sum(axis=2)
        out[s:s + chunk] = bits.min(axis=1)
    return out


@dataclass
class Reference:
    """The images that trained or selected the model: their sha256, pHashes and keypoints (where known)."""
    sha256: set[str]
    phash: np.ndarray | None
    n: int
    notes: list[str] = field(default_factory=list)
    keypoints: Keypoints | None = None


def save_training_keypoints(run_dir: Path, split_df: pd.DataFrame, paths: list[str], us_region: bool) -> None:
    """RUN/overlap_keypoints.npz for every image of split.csv (``split_df``; ``paths``: the manifest's files by
    index), kept when a resumed run's file already describes the same images."""
    idx = np.array(sorted(set(split_df["index"].astype(int))), dtype=np.int64)
    sha = split_df.drop_duplicates("index").set_index("index").loc[idx, "sha256"].astype(str).tolist()
    old = load_keypoints(run_dir / KEYPOINTS_FILE)
    if old is not None and old[0].tolist() == idx.tolist() and old[1] == sha:
        return
    d = describe_files([paths[i] for i in idx], us_region=us_region)
    save_keypoints(run_dir / KEYPOINTS_FILE, idx, sha, d.keypoints)


def _reference_keypoints(run_dir: Path, rows: pd.DataFrame, files: list[str] | None, us_region: bool
                         ) -> tuple[Keypoints | None, str | None]:
    """The keypoints of ``rows`` (split.csv rows): from RUN/overlap_keypoints.npz, else from the training files
    (``files``: their paths, None where some are gone), else None and a note saying what is not checked."""
    saved = load_keypoints(run_dir / KEYPOINTS_FILE)
    if saved is not None:
        pos = {int(i): k for k, i in enumerate(saved[0])}
        want = [pos.get(int(i)) for i in rows["index"]]
        if all(w is not None for w in want):
            return Keypoints.stack([saved[2].image(w) for w in want]), None
    if files is not None:
        return describe_files(files, us_region=us_region).keypoints, None
    return None, ("flipped-and-cropped, slightly rotated or padded copies not checked (keypoints): the run saved "
                  "none (trained before they were kept) and its images are gone; byte hash and the pHash of 8 "
                  "flips/quarter-turns only")


def _data_root(run_dir: Path) -> Path | None:
    from oncotransfer.data.manifest import resolve_data_path
    from oncotransfer.yaml_io import read_run_yaml
    try:
        cfg = read_run_yaml(run_dir / "config.yaml")[0]
        p = resolve_data_path(((cfg.get("data") or {}).get("path")))
    except Exception:  # noqa: BLE001 - a moved or missing data set: the check says so instead
        return None
    return p.parent if p.is_file() else p


def training_reference(run_dir: str | Path, folds: list[int] | None = None, size: int = 224,
                       us_region: bool = False) -> Reference:
    """Train and validation rows of ``folds`` (all folds: None) in RUN/split.csv, plus the test rows of a fold
    that selected its epoch on them. Hashes come from split.csv; a run written before they were saved there
    hashes its training files again, if they are still where the run found them."""
    from oncotransfer.data.images import decode_many
    from oncotransfer.data.manifest import sha256_file
    run_dir = Path(run_dir)
    split = read_csv(run_dir / "split.csv", dtype={"path": str, "sha256": str, "phash": str})
    if folds is not None:
        split = split[split["fold"].isin(folds)]
    with_val = set(split.loc[split["subset"] == "val", "fold"])
    used = split["subset"].isin(["train", "val"]) | ((split["subset"] == "test") & ~split["fold"].isin(with_val))
    rows = split[used].drop_duplicates("index")
    notes: list[str] = []
    need_sha, need_phash = "sha256" not in rows.columns, "phash" not in rows.columns
    need_kp = load_keypoints(run_dir / KEYPOINTS_FILE) is None
    files: list[str] = []
    all_files = None
    if need_sha or need_phash or need_kp:
        root = _data_root(run_dir)
        files = [str(p if Path(p).is_absolute() else (root / p if root else Path(p))) for p in rows["path"]]
        present = [f for f in files if Path(f).is_file()]
        if len(present) < len(files) and (need_sha or need_phash):  # (missing keypoints: their own note)
            notes.append(f"{len(files) - len(present)} of the run's {len(files)} training images are no longer at "
                         f"{root}: they could not be compared" + (" by pHash" if not need_sha else ""))
        all_files = files if len(present) == len(files) else None
        files = present
    sha = set(rows["sha256"]) if not need_sha else {sha256_file(f) for f in files}
    if not need_phash:
        ph = np.array([int(h, 16) for h in rows["phash"]], dtype=np.uint64)
    elif files:
        ph = decode_many(files, size, phash=True)[3]
    else:
        ph = None
    if ph is None:
        notes.append("near-identical images (pHash) not checked: the run saved no pHashes and its images are gone")
    kp, note = _reference_keypoints(run_dir, rows, all_files, us_region)
    return Reference(sha, ph, len(rows), notes + ([note] if note else []), kp)


@dataclass
class Overlap:
    identical: np.ndarray
    """bool per external row: byte-identical to a training image."""
    near: np.ndarray
    """bool per external row: not identical, but within NEAR_BITS of a training image's pHash in one of its 8
    orientations, or holding MIN_INLIERS keypoint matches with one."""
    reference: Reference
    by_keypoints: np.ndarray | None = None
    """bool per external row: near, and found by keypoints alone (the pHash missed it)."""
    inliers: np.ndarray | None = None
    """int per external row: the most verified keypoint matches with one reference image (None: not checked)."""

    @property
    def mask(self) -> np.ndarray:
        return self.identical | self.near

    def summary(self, paths: list[str], clean: dict | None) -> dict:
        n_bad = int(self.mask.sum())
        return {"n": int(len(self.mask)), "overlapping": n_bad, "identical": int(self.identical.sum()),
                "near_identical": int(self.near.sum()), "reference_images": self.reference.n,
                "near_bits": NEAR_BITS, "by_keypoints": int(self.by_keypoints.sum()) if self.by_keypoints is not None
                else None, "min_inliers": MIN_INLIERS if self.reference.keypoints is not None else None, "examples": [p for p, b in zip(paths, self.mask) if b][:5],
                "clean": clean, "notes": list(self.reference.notes)}


def find_overlap(sha256: list[str], phash: np.ndarray | None, ref: Reference, query: Described | None = None,
                 exact_inliers: bool = False) -> Overlap:
    """Which external images (``sha256``; ``phash``: (N,) or (N, 8) dihedral; ``query``: their keypoints and
    dihedral pHashes, from ``describe_files(..., mirrored=True)``) copy a reference image. Keypoints are
    verified only for images the hashes did not name, and only until MIN_INLIERS matches (``exact_inliers``:
    every image, to the most matches: what benchmarks/overlap.py reports)."""
    identical = np.array([h in ref.sha256 for h in sha256], dtype=bool)
    near = np.zeros(len(sha256), dtype=bool)
    if query is not None:
        phash = np.where(query.ok[:, None], query.phashes,
                         (phash if phash is not None else np.zeros(len(sha256), np.uint64)).reshape(-1, 1)[:, :1])
    if phash is not None and ref.phash is not None and len(ref.phash):
        ph = np.asarray(phash, dtype=np.uint64).reshape(len(sha256), -1)
        near = (np.min([hamming_min(ph[:, k], ref.phash) for k in range(ph.shape[1])], axis=0) <= NEAR_BITS)
    by_kp = inliers = None
    if query is not None and ref.keypoints is not None:
        inliers = best_inliers([query.keypoints, query.mirrored], ref.keypoints,
                               *((None, None) if exact_inliers else (MIN_INLIERS, ~(near | identical))))
        kp = inliers >= MIN_INLIERS
        by_kp = kp & ~near & ~identical
        near = near | kp
    return Overlap(identical, near & ~identical, ref, by_kp, inliers)


def overlap_line(ov: dict) -> str:
    """One sentence for the terminal and the report's protocol block."""
    if not ov["overlapping"]:
        return (f"Overlap with the run's training images: none of {ov['n']} images (byte hash, pHash within "
                f"{ov['near_bits']} bits in 8 flips/quarter-turns"
                + (f", {ov['min_inliers']}+ matching keypoints" if ov.get("min_inliers") else "")
                + f"; against {ov['reference_images']} train/validation images)")
    text = (f"{ov['overlapping']} of {ov['n']} images overlap the run's training/validation images "
            f"({ov['identical']} byte-identical, {ov['near_identical']} near-identical: pHash within "
            f"{ov['near_bits']} bits in one of 8 flips/quarter-turns"
            + (f", or {ov['min_inliers']}+ matching keypoints" if ov.get("min_inliers") else "")
            + f"), e.g. {', '.join(ov['examples'][:3])}: the full-set score is inflated")
    c = ov.get("clean")
    if c:
        text += (f"; on the clean remainder ({c['n']} images) accuracy {c['accuracy']:.4f}, balanced accuracy "
                 f"{c['balanced_accuracy']:.4f}")
    else:
        text += "; no clean remainder to score"
    return text
