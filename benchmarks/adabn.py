"""AdaBN on real data: a frozen Lite0 + logistic-regression head trained on busi-dev, scored on bus250.

    HF_HUB_OFFLINE=1 python benchmarks/adabn.py [--busi ../shared/data/busi-dev] [--bus250 ../shared/data/bus250]
        [--cache /tmp/oncotransfer_shift]

Features as in benchmarks/shift.py (frozen packaged EfficientNet-Lite0, 224 px, cached). The head is
StandardScaler + LogisticRegression on busi-dev's pooled features. Rows:
- none: bus250 scored with the backbone as loaded (its BatchNorm statistics are ImageNet's);
- target: ``infer.adapt.adapt_batchnorm`` on bus250's own images before scoring it (what scoring an external
  set with AdaBN does to a run);
- source + target: the backbone adapted to busi-dev before the head is trained, and to bus250 before scoring
  (AdaBN as its paper means it when the source statistics are not the source data's, as in a frozen run).
The in-domain line is busi-dev's duplicate-grouped 5-fold accuracy of the same head. ``shift AUC`` is the
domain-classifier AUC of ``shift_test`` between the busi-dev and bus250 features of that row.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from shift import CACHE, SHARED, collapse_duplicates, decoded, embed, features_for, lite0, shift_test


def head():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))


def adapted_features(model, images, batch: int = 32, cache: Path | None = None) -> np.ndarray:
    """``images`` embedded by a copy of ``model`` whose BatchNorm statistics are re-estimated on them
    (cached at ``cache`` when given)."""
    if cache is not None and cache.is_file():
        return np.load(cache)
    from oncotransfer.data.images import normalise
    from oncotransfer.infer.adapt import adapt_batchnorm
    batches = (normalise(images[s:s + batch], model.weights.mean, model.weights.std)
               for s in range(0, len(images), batch))
    (adapted,) = adapt_batchnorm([model], batches)
    x = embed(adapted, images, batch)
    if cache is not None:
        np.save(cache, x)
    return x


def group_bootstrap(y: np.ndarray, preds: dict[str, np.ndarray], groups: np.ndarray, reps: int = 2000,
                    random_state: int = 0) -> dict[str, np.ndarray]:
    """(reps, 2) accuracy and balanced accuracy per row, resampling whole duplicate groups (bus250 holds ~5
    augmented copies of each original, so images are not independent); the same resamples for every row."""
    from sklearn.metrics import balanced_accuracy_score
    rng = np.random.default_rng(random_state)
    ids = np.unique(groups)
    members = [np.nonzero(groups == g)[0] for g in ids]
    out = {k: np.zeros((reps, 2)) for k in preds}
    for b in range(reps):
        idx = np.concatenate([members[i] for i in rng.integers(0, len(ids), len(ids))])
        for k, p in preds.items():
            out[k][b] = (np.mean(p[idx] == y[idx]), balanced_accuracy_score(y[idx], p[idx]))
    return out


def _ci(v: np.ndarray) -> str:
    lo, hi = np.percentile(v, [2.5, 97.5])
    return f"{lo:.3f} to {hi:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busi", type=Path, default=SHARED / "busi-dev")
    ap.add_argument("--bus250", type=Path, default=SHARED / "bus250")
    ap.add_argument("--cache", type=Path, default=CACHE)
    args = ap.parse_args()
    import torch
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.metrics import accuracy_score, balanced_accuracy_score
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model = lite0()
    busi = features_for(args.busi, cache=args.cache, model=model)
    bus = features_for(args.bus250, cache=args.cache, model=model)
    if busi.classes != bus.classes:
        raise SystemExit(f"class names differ: {busi.classes} vs {bus.classes}")
    cv = cross_val_predict(head(), busi.x, busi.labels, groups=busi.groups, cv=GroupKFold(5))
    print(f"in-domain (busi-dev, duplicate-grouped 5-fold): accuracy {accuracy_score(busi.labels, cv):.3f}, "
          f"balanced accuracy {balanced_accuracy_score(busi.labels, cv):.3f}")
    t = time.perf_counter()
    bus_adapted = adapted_features(model, decoded(args.bus250, cache=args.cache)[1],
                                   cache=args.cache / f"{args.bus250.name}_224_lite0_adabn.npy")
    busi_adapted = adapted_features(model, decoded(args.busi, cache=args.cache)[1],
                                    cache=args.cache / f"{args.busi.name}_224_lite0_adabn.npy")
    print(f"adapting and embedding (or cache): {time.perf_counter() - t:.0f} s")
    rows = {"none": (busi.x, bus.x), "target": (busi.x, bus_adapted), "source + target": (busi_adapted, bus_adapted)}
    preds, auc = {}, {}
    for name, (train, test) in rows.items():
        preds[name] = head().fit(train, busi.labels).predict(test)
        auc[name] = shift_test(collapse_duplicates(train, busi.groups), collapse_duplicates(test, bus.groups),
                               200).domain_auc
    boot = group_bootstrap(bus.labels, preds, bus.groups)
    print(f"bus250: {len(bus.labels)} images in {len(np.unique(bus.groups))} duplicate groups; 95 % CIs resample "
          "the groups\n")
    print("| AdaBN | bus250 accuracy (95 % CI) | balanced accuracy (95 % CI) | shift AUC |\n|---|---|---|---|")
    for name, p in preds.items():
        acc, bal = np.mean(p == bus.labels), balanced_accuracy_score(bus.labels, p)
        print(f"| {name} | {acc:.3f} ({_ci(boot[name][:, 0])}) | {bal:.3f} ({_ci(boot[name][:, 1])}) | "
              f"{auc[name]:.3f} |")
    for name in ("target", "source + target"):
        d = boot[name] - boot["none"]
        print(f"{name} minus none: accuracy 95 % CI {_ci(d[:, 0])}, balanced accuracy 95 % CI {_ci(d[:, 1])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
