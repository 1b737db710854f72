"""Holdout, train-val-test, k-fold and leave-one-patient-out splits, grouped by patient; leakage checked."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pandas as pd
from sklearn.model_selection import (GroupShuffleSplit, LeaveOneGroupOut, StratifiedGroupKFold, StratifiedKFold,
                                     train_test_split)

from oncotransfer.config import SplitConfig
from oncotransfer.data.groups import UnionFind
from oncotransfer.data.manifest import Manifest
from oncotransfer.errors import ConfigError, DataError, LeakageError


@dataclass(frozen=True)
class Fold:
    index: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    @property
    def selection_on_test(self) -> bool:
        return np.array_equal(np.sort(self.val), np.sort(self.test))


@dataclass
class Split:
    kind: str
    folds: list[Fold]
    grouped_by: str | None
    """'patient', 'duplicates' (near-identical images kept together) or None."""
    image_level: bool
    warnings: list[str] = field(default_factory=list)

    @property
    def selection_on_test(self) -> bool:
        return any(f.selection_on_test for f in self.folds)

    def to_frame(self, manifest: Manifest) -> pd.DataFrame:
        rows = []
        for f in self.folds:
            for subset, idx in (("train", f.train), ("val", f.val), ("test", f.test)):
                if subset == "val" and f.selection_on_test:
                    continue
                for i in idx:
                    rows.append({"path": manifest.relpath(i), "label": manifest.classes[manifest.labels[i]],
                                 "patient": None if manifest.patients is None else manifest.patients[i],
                                 "fold": f.index, "subset": subset, "index": int(i)})
        return pd.DataFrame(rows)


def _groups(manifest: Manifest, cfg: SplitConfig, dup_groups: np.ndarray | None) -> tuple[np.ndarray | None, str | None]:
    """Group per image: patient (merged across near-duplicates), or duplicate groups alone, or None."""
    base = None
    kind = None
    if cfg.group_by_patient and manifest.patients is not None:
        base, kind = np.unique(manifest.patients.astype(str), return_inverse=True)[1], "patient"
    if cfg.group_duplicates and dup_groups is not None and len(np.unique(dup_groups)) < len(dup_groups):
        if base is None:
            return dup_groups, "duplicates"
        # A near-duplicate pair filed under two patients joins those patients into one group.
        pairs = pd.DataFrame({"p": base, "d": dup_groups})
        sets = UnionFind(np.unique(base))
        for _, g in pairs.groupby("d"):
            ps = g["p"].unique()
            for q in ps[1:]:
                sets.union(q, ps[0])
        base = np.array([sets.find(p) for p in base])
    return base, kind


def _holdout(y, groups, size, seed):
    idx = np.arange(len(y))
    if groups is None:
        return train_test_split(idx, test_size=size, stratify=y, random_state=seed)
    n_splits = max(2, int(round(1 / size)))
    if len(np.unique(groups)) >= n_splits:
        sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        try:
            return next(sgkf.split(idx, y, groups))
        except ValueError:  # too few images per class to stratify: fall back to an unstratified group split
            pass
    gss = GroupShuffleSplit(n_splits=1, test_size=size, random_state=seed)
    return next(gss.split(idx, y, groups))


def _inner_val(train: np.ndarray, y, groups, size: float, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    if size <= 0:
        return train, None
    g = None if groups is None else groups[train]
    if g is not None and len(np.unique(g)) < 2:
        return train, None
    try:
        a, b = _holdout(y[train], g, size, seed)
    except ValueError:
        return train, None
    return train[a], train[b]


@dataclass(frozen=True)
class SplitInputs:
    """What a splitter sees: labels ``y`` and per-image ``groups`` (None: split images) come ready-made."""
    manifest: Manifest
    cfg: SplitConfig
    y: np.ndarray
    groups: np.ndarray | None
    grouped_by: str | None


Splitter = Callable[[SplitInputs], list[Fold]]
SPLITTERS: dict[str, Splitter] = {}
"""split.kind -> function returning the folds; a new kind is one registered function (and its name in
``config.SplitConfig.kind``)."""


def register_splitter(kind: str) -> Callable[[Splitter], Splitter]:
    def add(fn: Splitter) -> Splitter:
        SPLITTERS[kind] = fn
        return fn
    return add


def splitter(kind: str) -> Splitter:
    """The registered splitter of ``split.kind``; an unknown name is a one-line error listing the valid ones."""
    if kind not in SPLITTERS:
        raise ConfigError(f"split.kind: unknown split {kind!r}; expected one of {', '.join(SPLITTERS)}")
    return SPLITTERS[kind]


@register_splitter("holdout")
def _holdout_split(s: SplitInputs) -> list[Fold]:
    tr, te = _holdout(s.y, s.groups, s.cfg.test_size, s.cfg.seed)
    return [Fold(0, np.sort(tr), np.sort(te), np.sort(te))]


@register_splitter("train-val-test")
def _train_val_test(s: SplitInputs) -> list[Fold]:
    cfg = s.cfg
    rest, te = _holdout(s.y, s.groups, cfg.test_size, cfg.seed)
    rel = cfg.val_size / (1 - cfg.test_size)
    tr, va = _inner_val(np.asarray(rest), s.y, s.groups, rel, cfg.seed + 1)
    if va is None:
        raise DataError("split: too few groups to carve a validation set; lower split.val_size or use kfold")
    return [Fold(0, np.sort(tr), np.sort(va), np.sort(te))]


def _with_inner_val(s: SplitInputs, splitter) -> list[Fold]:
    """Outer (train, test) pairs -> folds whose validation subset is carved from train (grouped like the
    split) when split.val_size > 0; without one, the test fold doubles as validation (and the report says so)."""
    folds = []
    for k, (tr, te) in enumerate(splitter):
        tr2, va = _inner_val(np.asarray(tr), s.y, s.groups, s.cfg.val_size, s.cfg.seed + k)
        folds.append(Fold(k, np.sort(tr2), np.sort(te if va is None else va), np.sort(te)))
    return folds


@register_splitter("kfold")
def _kfold(s: SplitInputs) -> list[Fold]:
    cfg, idx = s.cfg, np.arange(len(s.y))
    if s.groups is None:
        return _with_inner_val(s, StratifiedKFold(cfg.folds, shuffle=True, random_state=cfg.seed).split(idx, s.y))
    if len(np.unique(s.groups)) < cfg.folds:
        raise DataError(f"split.folds={cfg.folds} but only {len(np.unique(s.groups))} {s.grouped_by} groups "
                        f"exist; lower split.folds or use split.kind: lopo")
    splitter = StratifiedGroupKFold(cfg.folds, shuffle=True, random_state=cfg.seed).split(idx, s.y, s.groups)
    return _with_inner_val(s, splitter)


@register_splitter("lopo")
def _leave_one_patient_out(s: SplitInputs) -> list[Fold]:
    if s.manifest.patients is None:
        raise DataError("split.kind lopo (leave-one-patient-out) needs patient ids; give a patient column "
                        "or --patient-regex")
    idx = np.arange(len(s.y))
    return _with_inner_val(s, LeaveOneGroupOut().split(idx, s.y, s.manifest.patients.astype(str)))


def make_split(manifest: Manifest, cfg: SplitConfig, dup_groups: np.ndarray | None = None) -> Split:
    """Build the split the config asks for; refuse image-level splits unless explicitly allowed."""
    y = manifest.labels
    groups, grouped_by = _groups(manifest, cfg, dup_groups)
    warnings = []
    if cfg.group_by_patient and manifest.patients is None:
        if not cfg.allow_image_level_split:
            raise LeakageError("split.group_by_patient is true but the data has no patient ids; give a patient "
                               "column in the manifest or --patient-regex, or set split.allow_image_level_split: "
                               "true (the report will say the split is image-level)")
        warnings.append("no patient ids: the split is IMAGE-LEVEL; images of one patient may be on both sides")
    elif not cfg.group_by_patient and manifest.patients is not None:
        if not cfg.allow_image_level_split:
            raise LeakageError("split.group_by_patient is false although the data has patient ids: patients would "
                               "be on both sides; set split.allow_image_level_split: true to do it anyway")
        warnings.append("split.group_by_patient is false: the split is IMAGE-LEVEL and patients may sit on both "
                        "sides, so accuracy is inflated")
    image_level = grouped_by != "patient"
    split_fn = splitter(cfg.kind)
    try:
        folds = split_fn(SplitInputs(manifest, cfg, y, groups, grouped_by))
    except ValueError as e:
        raise DataError(f"split {cfg.kind!r} is impossible on this data ({str(e)[:120]}); "
                        "use fewer folds or another split.kind") from None
    split = Split(cfg.kind, folds, grouped_by, image_level, warnings)
    check_no_leak(split, manifest, dup_groups, strict=not cfg.allow_image_level_split)
    return split


def check_no_leak(split: Split, manifest: Manifest, dup_groups: np.ndarray | None = None,
                  strict: bool = True) -> list[str]:
    """Stop if a patient or an identical image sits on both sides of any fold (warn only when not strict)."""
    problems = []
    sha = np.array(manifest.sha256)
    for f in split.folds:
        held = np.union1d(f.val, f.test)
        if manifest.patients is not None and split.grouped_by == "patient":
            shared = set(manifest.patients[f.train]) & set(manifest.patients[held])
            if shared:
                problems.append(f"fold {f.index}: patients {sorted(map(str, shared))[:5]} are in train and test")
        same = set(sha[f.train]) & set(sha[held])
        if same:
            names = [manifest.relpath(i) for i in held if sha[i] in same][:3]
            problems.append(f"fold {f.index}: {len(same)} identical image(s) in train and test, e.g. {names}")
        if dup_groups is not None and split.grouped_by is not None:
            near = set(dup_groups[f.train]) & set(dup_groups[held])
            if near:
                problems.append(f"fold {f.index}: {len(near)} near-duplicate group(s) span train and test")
    if problems and strict:
        raise LeakageError(problems[0] + "; use split.group_by_patient: true and split.group_duplicates: true, "
                           "or split.allow_image_level_split: true")
    split.warnings.extend(problems)
    return problems
