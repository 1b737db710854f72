"""Holdout, train-val-test, k-fold and leave-one-patient-out splits, grouped by patient; leakage checked."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
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


def _holdout_candidates(y, groups, size, seed, alternatives: int = 0):
    """(train, held) pairs, best first: the first is the split ``_holdout`` makes; then, up to ``alternatives``
    more, the other folds of the same grouped k-fold and further seeded group shuffles (same size, same seed)."""
    idx = np.arange(len(y))
    if groups is None:
        yield train_test_split(idx, test_size=size, stratify=y, random_state=seed)
        return
    n_splits = max(2, int(round(1 / size)))
    folds = []
    if len(np.unique(groups)) >= n_splits:
        sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        try:
            folds = list(sgkf.split(idx, y, groups))
        except ValueError:  # too few images per class to stratify: fall back to an unstratified group split
            folds = []
    yield from folds[:1 + alternatives]
    left = 1 + alternatives - min(len(folds), 1 + alternatives)
    if left > 0:
        # The first shuffle of n_splits=k equals the only one of n_splits=1 (one seeded generator), so a fallback
        # split stays what it was.
        yield from GroupShuffleSplit(n_splits=left, test_size=size, random_state=seed).split(idx, y, groups)


def _holdout(y, groups, size, seed):
    return next(_holdout_candidates(y, groups, size, seed))


_INNER_CANDIDATES = 32
"""How many validation candidates ``_inner_val`` may try to keep every class in a fold's training part."""


def _inner_val(train: np.ndarray, y, groups, size: float, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Carve a validation subset (grouped like the split) out of ``train``. Class-preserving where possible: the
    first candidate whose remaining training part still holds every class of ``train`` wins, so a split whose
    first candidate already did that is unchanged, and one patient holding a rare class is not held out."""
    if size <= 0:
        return train, None
    g = None if groups is None else groups[train]
    if g is not None and len(np.unique(g)) < 2:
        return train, None
    need = len(np.unique(y[train]))
    first = None
    try:
        for a, b in _holdout_candidates(y[train], g, size, seed, _INNER_CANDIDATES):
            first = first or (a, b)
            if len(np.unique(y[train][a])) == need:
                return train[a], train[b]
    except ValueError:
        pass
    if first is None:
        return train, None
    return train[first[0]], train[first[1]]


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
        raise DataError("split.kind lopo (leave-one-patient-out) needs patient ids; " + how_to_give_patients(s.manifest))
    idx = np.arange(len(s.y))
    return _with_inner_val(s, LeaveOneGroupOut().split(idx, s.y, s.manifest.patients.astype(str)))


def how_to_give_patients(manifest: Manifest) -> str:
    """The ways to give patient ids, naming the objects whose header lacks one when that is why there are none."""
    how = ("give a patient column in a manifest CSV (path,label,patient) or a regex on file names "
           "(data.patient_regex in the config, or --set data.patient_regex='^(P\\d+)')")
    missing = manifest.ungrouped
    if not missing:
        return how
    names = ", ".join(Path(p).name for p in missing[:3]) + (" and more" if len(missing) > 3 else "")
    return f"{len(missing)}{'+' if len(missing) >= 50 else ''} object(s) have no PatientID in their header ({names}); {how}"


def make_split(manifest: Manifest, cfg: SplitConfig, dup_groups: np.ndarray | None = None) -> Split:
    """Build the split the config asks for; refuse image-level splits unless explicitly allowed."""
    y = manifest.labels
    groups, grouped_by = _groups(manifest, cfg, dup_groups)
    warnings = []
    if cfg.group_by_patient and manifest.patients is None:
        if not cfg.allow_image_level_split:
            raise LeakageError("split.group_by_patient is true but the data has no patient ids; "
                               + how_to_give_patients(manifest) + ", or set split.allow_image_level_split: true "
                               "(the report will say the split is image-level)")
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
    check_training_classes(split, manifest, cfg, groups)
    if cfg.kind == "lopo":
        split.warnings.extend(few_patient_classes(manifest))
    return split


def _holders(manifest: Manifest, grouped_by: str | None, groups: np.ndarray | None, rows: np.ndarray) -> str:
    """Who holds ``rows`` (one class's images), in words: patients by id, else duplicate groups or images."""
    if manifest.patients is not None and grouped_by == "patient":
        ids = sorted({str(p) for p in manifest.patients[rows]})
        return f"patient(s) {', '.join(ids[:6])}" + (f" and {len(ids) - 6} more" if len(ids) > 6 else "")
    if groups is not None and grouped_by == "duplicates":
        return f"{len(np.unique(groups[rows]))} duplicate group(s) of {len(rows)} image(s)"
    return f"{len(rows)} image(s)"


def check_training_classes(split: Split, manifest: Manifest, cfg: SplitConfig, groups: np.ndarray | None) -> None:
    """Stop before any training when a fold's training part has no image of a class the data holds: that fold's
    model could never predict the class, and its test images of it would all count as errors."""
    y = manifest.labels
    for f in split.folds:
        missing = np.setdiff1d(np.unique(y), np.unique(y[f.train]))
        if len(missing):
            c = int(missing[0])
            rows = np.flatnonzero(y == c)
            in_val = not f.selection_on_test and bool(np.any(y[f.val] == c))
            fix = _class_fixes(cfg, len(np.unique(groups)) if groups is not None else len(y), in_val)
            fix += ["more " + ("patients" if split.grouped_by == "patient" else "images") + " of that class"]
            fix = ", ".join(fix[:-1]) + (" or " if len(fix) > 1 else "") + fix[-1]
            raise DataError(f"split {cfg.kind}: fold {f.index}'s training part has no {manifest.classes[c]!r} image "
                            f"(the class is held by {_holders(manifest, split.grouped_by, groups, rows)}, all held "
                            f"out of it for testing or validation); try {fix}")


def _class_fixes(cfg: SplitConfig, n_groups: int, in_val: bool) -> list[str]:
    """Settings that give a fold a larger training part (more folds, not fewer: each trains on (k-1)/k); a lower
    split.val_size only where the validation subset took some of the class."""
    fixes = {"kfold": ["more split.folds"] * (cfg.folds < n_groups) + ["another split.seed"],
             "holdout": ["a lower split.test_size", "another split.seed"],
             "train-val-test": ["a lower split.test_size", "another split.seed"]}.get(cfg.kind, [])
    return fixes + ["a lower split.val_size"] * in_val


def few_patient_classes(manifest: Manifest, at_most: int = 2) -> list[str]:
    """Leave-one-patient-out warnings: a class held by at most two patients is learnt, in the fold that tests
    one of them, from a single other patient (or none), so its per-class results say little."""
    if manifest.patients is None:
        return []
    out = []
    for c in np.unique(manifest.labels):
        ids = sorted({str(p) for p in manifest.patients[manifest.labels == c]})
        if len(ids) <= at_most:
            out.append(f"class {manifest.classes[int(c)]!r} comes from only {len(ids)} patient(s) ({', '.join(ids)}): "
                       "leave-one-patient-out learns it from at most one other patient per fold, so its results "
                       "may reflect the patient rather than the class")
    return out


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
