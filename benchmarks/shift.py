"""Dataset-shift test on real features: does it fire between data sets, and stay quiet inside one?

    HF_HUB_OFFLINE=1 python benchmarks/shift.py [--busi ../shared/data/busi-dev] [--bus250 ../shared/data/bus250]
        [--partitions 20] [--permutations 1000] [--cache /tmp/oncotransfer_shift]

Features: frozen EfficientNet-Lite0 (packaged ImageNet weights) pooled features at 224 px, the images decoded
by the project's one decoder and normalised with the weights' own mean and std; cached as .npz under
``--cache``. Each side keeps one image per near-duplicate group (identical bytes or pHash within 4 bits, the
splits' rule) before testing. Rows: (a) busi-dev against bus250: two breast-ultrasound sets from different
sites and scanners, target p < 0.01; (b) false alarms: ``--partitions`` random 80/20 splits of busi-dev's
duplicate groups tested against each other, target at most 1 in 20 with p < 0.01 (the test is exact, so
about 1 in 100 is expected). Also: power with only 10 or 20 external images (one per duplicate group of bus250),
and a label shift (the external part of a grouped 70/30 split of busi-dev keeps one class only).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from oncotransfer.evaluate.shift import ShiftResult, collapse_duplicates, shift_test  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
CACHE = Path("/tmp/oncotransfer_shift")


@dataclass
class Features:
    x: np.ndarray
    """(N, D) pooled backbone features."""
    labels: np.ndarray
    classes: list[str]
    groups: np.ndarray
    """near-duplicate group per row (``data.manifest.duplicate_groups``)."""
    paths: list[str]


def lite0():
    """The frozen packaged Lite0 classifier (2-class head, unused) in eval mode."""
    from oncotransfer.config import HeadConfig
    from oncotransfer.models.factory import create_classifier
    return create_classifier("efficientnet_lite0", "efficientnet_lite0_packaged", HeadConfig(), 2).eval()


def decoded(data: Path, size: int = 224, cache: Path = CACHE):
    """(manifest, uint8 images (N, 3, size, size), pHashes) of every readable image, cached as .npz."""
    import torch
    from oncotransfer.data.images import decode_many
    from oncotransfer.data.manifest import drop, load_manifest
    m = load_manifest(data)
    f = cache / f"{data.name}_{size}_images.npz"
    if f.is_file():
        z = np.load(f)
        keep = [m.paths.index(p) for p in z["paths"]]
        return m.subset(keep), torch.from_numpy(z["images"]), z["phash"]
    images, ok, failed, ph = decode_many(m.paths, size, phash=True)
    m = drop(m, failed)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(f, images=images.numpy(), phash=ph, paths=np.array(m.paths))
    return m, images, ph


def embed(model, images, batch: int = 32) -> np.ndarray:
    """uint8 images -> the model's pooled features (what a frozen head reads)."""
    import torch
    from oncotransfer.data.images import normalise
    out = []
    with torch.inference_mode():
        for s in range(0, len(images), batch):
            x = normalise(images[s:s + batch], model.weights.mean, model.weights.std)
            out.append(model.feature_module()(x).float().numpy())
    return np.concatenate(out)


def features_for(data: Path, size: int = 224, cache: Path = CACHE, model=None) -> Features:
    """Lite0 features of a data set folder, computed once and cached under ``cache``."""
    from oncotransfer.data.manifest import duplicate_groups
    m, images, ph = decoded(data, size, cache)
    f = cache / f"{data.name}_{size}_lite0.npy"
    if f.is_file():
        x = np.load(f)
    else:
        x = embed(model or lite0(), images)
        np.save(f, x)
    return Features(x, m.labels, m.classes, duplicate_groups(m.sha256, ph), list(m.paths))


def between(a: Features, b: Features, permutations: int = 1000, random_state: int = 0) -> ShiftResult:
    """``a`` as the reference, ``b`` as the external set, each with near-duplicates collapsed."""
    return shift_test(collapse_duplicates(a.x, a.groups), collapse_duplicates(b.x, b.groups), permutations,
                      random_state=random_state)


def false_alarms(f: Features, partitions: int = 20, test_size: float = 0.2, permutations: int = 1000,
                 random_state: int = 0) -> list[ShiftResult]:
    """Shift tests between random duplicate-grouped splits of one data set (no shift exists)."""
    from sklearn.model_selection import GroupShuffleSplit
    splits = GroupShuffleSplit(partitions, test_size=test_size, random_state=random_state).split(f.x, groups=f.groups)
    out = []
    for k, (ref, ext) in enumerate(splits):
        out.append(shift_test(collapse_duplicates(f.x[ref], f.groups[ref]),
                              collapse_duplicates(f.x[ext], f.groups[ext]), permutations, random_state=k))
    return out


def label_shift(f: Features, cls: int, test_size: float = 0.3, permutations: int = 1000, random_state: int = 0
                ) -> ShiftResult:
    """A grouped split whose external part keeps only class ``cls``: the same images, another class mix."""
    from sklearn.model_selection import GroupShuffleSplit
    ref, ext = next(GroupShuffleSplit(1, test_size=test_size, random_state=random_state).split(f.x, groups=f.groups))
    ext = ext[f.labels[ext] == cls]
    return shift_test(collapse_duplicates(f.x[ref], f.groups[ref]), collapse_duplicates(f.x[ext], f.groups[ext]),
                      permutations, random_state=random_state)


def small_external(a: Features, b: Features, n: int, permutations: int = 1000, random_state: int = 0
                   ) -> ShiftResult:
    """``a`` against ``n`` images of ``b`` (one per duplicate group, drawn at random): power at small n."""
    rows = collapse_duplicates(b.x, b.groups)
    pick = np.random.default_rng(random_state).choice(len(rows), min(n, len(rows)), replace=False)
    return shift_test(collapse_duplicates(a.x, a.groups), rows[pick], permutations, random_state=random_state)


def _row(name: str, r: ShiftResult, seconds: float) -> str:
    return (f"| {name} | {r.n_reference} | {r.n_external} | {r.statistic:.4f} | {r.p_value:.4f} | "
            f"{r.domain_auc:.3f} | {seconds:.1f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busi", type=Path, default=SHARED / "busi-dev")
    ap.add_argument("--bus250", type=Path, default=SHARED / "bus250")
    ap.add_argument("--partitions", type=int, default=20)
    ap.add_argument("--permutations", type=int, default=1000)
    ap.add_argument("--cache", type=Path, default=CACHE)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.perf_counter()
    model = lite0()
    busi = features_for(args.busi, cache=args.cache, model=model)
    bus250 = features_for(args.bus250, cache=args.cache, model=model)
    t_feat = time.perf_counter() - t0
    print(f"features: busi-dev {busi.x.shape} ({len(np.unique(busi.groups))} duplicate groups), bus250 "
          f"{bus250.x.shape} ({len(np.unique(bus250.groups))} groups), {t_feat:.0f} s incl. cache")
    print(f"| test | reference | external | MMD² | p | domain AUC | seconds |\n|---|---|---|---|---|---|---|")
    t = time.perf_counter()
    print(_row("busi-dev vs bus250", between(busi, bus250, args.permutations), time.perf_counter() - t))
    for n in (10, 20):
        t = time.perf_counter()
        print(_row(f"busi-dev vs {n} bus250 images", small_external(busi, bus250, n, args.permutations),
                   time.perf_counter() - t))
    for c, name in enumerate(busi.classes):
        t = time.perf_counter()
        r = label_shift(busi, c, permutations=args.permutations)
        print(_row(f"busi-dev 70 % vs the other 30 %'s {name} only", r, time.perf_counter() - t))
    t = time.perf_counter()
    runs = false_alarms(busi, args.partitions, permutations=args.permutations)
    per = (time.perf_counter() - t) / max(1, len(runs))
    for k, r in enumerate(runs):
        print(_row(f"busi-dev split {k}", r, per))
    ps = np.array([r.p_value for r in runs])
    print(f"\nfalse alarms (busi-dev vs itself, {len(runs)} grouped 80/20 splits): p < 0.01 in "
          f"{int((ps < 0.01).sum())}/{len(runs)}, p < 0.05 in {int((ps < 0.05).sum())}/{len(runs)}; "
          f"median p {np.median(ps):.3f}; domain AUC median {np.median([r.domain_auc for r in runs]):.3f}")
    print(between(busi, bus250, args.permutations).line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
