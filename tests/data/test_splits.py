"""Splits never leak patients: property test over random manifests and every split kind."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from oncotransfer.config import SplitConfig
from oncotransfer.data.manifest import Manifest
from oncotransfer.data.splits import make_split
from oncotransfer.errors import DataError, LeakageError


def manifest(patient_labels: list[list[int]], n_classes: int, dup_sha: dict[int, str] | None = None) -> Manifest:
    """One row per image; patient k has the labels in ``patient_labels[k]``; sha256 unique unless overridden."""
    paths, labels, patients = [], [], []
    for k, ls in enumerate(patient_labels):
        for j, lab in enumerate(ls):
            paths.append(f"/data/c{lab}/P{k}_{j}.png")
            labels.append(lab)
            patients.append(f"P{k}")
    sha = [f"{i:064x}" for i in range(len(paths))]
    for i, h in (dup_sha or {}).items():
        sha[i] = h
    return Manifest(Path("/data"), paths, np.array(labels), [f"c{c}" for c in range(n_classes)],
                    np.array(patients, dtype=object), sha)


@st.composite
def manifests(draw):
    n_classes = draw(st.integers(2, 4))
    n_patients = draw(st.integers(3, 12))
    per = [draw(st.lists(st.integers(0, n_classes - 1), min_size=1, max_size=6)) for _ in range(n_patients)]
    # every class present somewhere
    flat = {c for ls in per for c in ls}
    for c in range(n_classes):
        if c not in flat:
            per[c % n_patients].append(c)
    return manifest(per, n_classes), n_patients


def check_fold_partition(m: Manifest, fold, whole: bool) -> None:
    n = len(m)
    tr, va, te = fold.train, fold.val, fold.test
    for a in (tr, va, te):
        assert len(np.unique(a)) == len(a), "duplicate indices inside one subset"
        assert a.min(initial=0) >= 0 and a.max(initial=0) < n
    assert len(np.intersect1d(tr, te)) == 0
    assert len(te) > 0 and len(tr) > 0
    if not fold.selection_on_test:
        assert len(np.intersect1d(tr, va)) == 0
        assert len(np.intersect1d(va, te)) == 0
    held = np.union1d(va, te)
    if whole:
        assert len(np.union1d(tr, held)) == n, "train + val + test must cover every image"
    # the point: no patient on two sides
    p_tr, p_va, p_te = (set(m.patients[x]) for x in (tr, va, te))
    assert not (p_tr & p_te), f"patients in train and test: {p_tr & p_te}"
    if not fold.selection_on_test:
        assert not (p_tr & p_va) and not (p_va & p_te)


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=manifests(), kind=st.sampled_from(["holdout", "train-val-test", "kfold", "lopo"]),
       folds=st.integers(2, 12), seed=st.integers(0, 5))
def test_no_patient_on_two_sides(data, kind, folds, seed):
    m, n_patients = data
    if kind == "kfold":
        assume(folds <= n_patients)
    cfg = SplitConfig(kind=kind, folds=folds, group_by_patient=True, group_duplicates=True, seed=seed,
                      val_size=0.2, test_size=0.2)
    try:
        split = make_split(m, cfg, dup_groups=np.arange(len(m)))
    except DataError as e:
        # legitimate refusals only: a 3-way split without groups left for validation, or more folds than
        # images in every class (stratification impossible), each said in words
        too_many = kind == "kfold" and folds > np.bincount(m.labels).max() and "impossible" in str(e)
        assert (kind == "train-val-test" and "validation" in str(e)) or too_many, str(e)
        return
    assert split.grouped_by == "patient" and not split.image_level
    for f in split.folds:
        check_fold_partition(m, f, whole=True)
    if kind in ("kfold", "lopo"):
        tests = np.concatenate([f.test for f in split.folds])
        assert sorted(tests.tolist()) == list(range(len(m))), "each image is tested exactly once"
        assert len(split.folds) == (folds if kind == "kfold" else n_patients)
    if kind == "lopo":
        for f in split.folds:
            assert len(set(m.patients[f.test])) == 1
    if kind in ("holdout", "train-val-test"):
        assert len(split.folds) == 1


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=manifests(), kind=st.sampled_from(["holdout", "kfold"]), pairs=st.lists(
    st.tuples(st.integers(0, 200), st.integers(0, 200)), max_size=3), seed=st.integers(0, 5))
def test_near_duplicates_across_patients_stay_on_one_side(data, kind, pairs, seed):
    """Near-duplicate groups (pHash) that span two patients merge those patients into one split group."""
    from oncotransfer.data.manifest import duplicate_groups
    m, n_patients = data
    n = len(m)
    ph = np.arange(n, dtype=np.uint64) * np.uint64(0xF0F0F0F0F0F0F0F)  # far apart
    for a, b in pairs:
        ph[b % n] = ph[a % n]
    dup = duplicate_groups(m.sha256, ph, max_distance=0)
    cfg = SplitConfig(kind=kind, folds=2, seed=seed, val_size=0.0, test_size=0.3)
    try:
        split = make_split(m, cfg, dup)
    except DataError as e:
        assert "groups" in str(e) or "impossible" in str(e)
        return
    for f in split.folds:
        assert not set(dup[f.train]) & set(dup[f.test])
        assert not set(m.patients[f.train]) & set(m.patients[f.test])


def test_identical_images_join_their_patients():
    # 6 patients, 2 images each; P0's first image is byte-identical to P3's first image
    m = manifest([[0, 1]] * 6, 2)
    m.sha256[6] = m.sha256[0]
    from oncotransfer.data.manifest import duplicate_groups
    dup = duplicate_groups(m.sha256)
    for seed in range(6):
        split = make_split(m, SplitConfig(kind="kfold", folds=3, seed=seed, val_size=0.0), dup)
        for f in split.folds:
            sides = {int(i) for i in f.train}, {int(i) for i in f.test}
            # P0 (rows 0, 1) and P3 (rows 6, 7) always land on the same side
            for s in sides:
                assert {0, 1, 6, 7} <= s or not ({0, 1, 6, 7} & s)
    # without duplicate grouping the pair can be separated, and the leak check catches that
    with pytest.raises(LeakageError, match="identical image"):
        for seed in range(20):
            make_split(m, SplitConfig(kind="kfold", folds=3, seed=seed, val_size=0.0, group_duplicates=False), dup)


def test_image_level_split_needs_the_allow_flag():
    m = manifest([[0, 1, 0], [1, 0, 1], [0, 1, 1], [1, 0, 0]], 2)
    with pytest.raises(LeakageError, match="allow_image_level_split"):
        make_split(m, SplitConfig(kind="kfold", folds=3, group_by_patient=False))
    split = make_split(m, SplitConfig(kind="kfold", folds=3, group_by_patient=False, allow_image_level_split=True))
    assert split.image_level is True
    assert any("IMAGE-LEVEL" in w for w in split.warnings)
    # no patient ids at all: same rule
    m.patients = None
    with pytest.raises(LeakageError, match="no patient ids"):
        make_split(m, SplitConfig(kind="holdout"))
    split = make_split(m, SplitConfig(kind="holdout", allow_image_level_split=True))
    assert split.image_level and any("IMAGE-LEVEL" in w for w in split.warnings)


def test_too_many_folds_is_a_clear_data_error():
    m = manifest([[0, 1], [1, 0], [0, 1]], 2)
    with pytest.raises(DataError, match=r"split.folds=5 but only 3 patient groups.*lower split.folds"):
        make_split(m, SplitConfig(kind="kfold", folds=5))


def test_lopo_without_patients_is_a_data_error():
    m = manifest([[0, 1], [1, 0], [0, 1]], 2)
    m.patients = None
    with pytest.raises(DataError, match="lopo"):
        make_split(m, SplitConfig(kind="lopo", allow_image_level_split=True))


def test_a_new_split_kind_is_one_registered_function(monkeypatch):
    """CONTRIBUTING.md's example: a temporal hold-out (train on the earlier patients, test on the later ones)
    is one function in data/splits.py; config, leakage check, run directory and report need nothing else."""
    from oncotransfer.data import splits
    from oncotransfer.errors import ConfigError

    def later_patients(s: splits.SplitInputs) -> list[splits.Fold]:
        order = np.argsort(s.groups, kind="stable")  # group ids follow patient order here
        cut = int(len(order) * (1 - s.cfg.test_size))
        tr, te = np.sort(order[:cut]), np.sort(order[cut:])
        return [splits.Fold(0, tr, te, te)]
    monkeypatch.setitem(splits.SPLITTERS, "later-patients", later_patients)
    m = manifest([[0, 0], [1, 1], [0, 1], [1, 0], [0, 0]], 2)
    split = make_split(m, SplitConfig(kind="later-patients", test_size=0.4))
    assert split.kind == "later-patients" and split.grouped_by == "patient" and len(split.folds) == 1
    check_fold_partition(m, split.folds[0], whole=True)
    with pytest.raises(ConfigError, match="later-patients"):  # the error lists the registered kinds
        make_split(m, SplitConfig(kind="nope"))


def test_lopo_selects_on_an_inner_patient_level_validation_split():
    """Leave-one-patient-out with val_size > 0: each fold's validation patients are neither test nor train
    patients, so no epoch is chosen on the test fold; with val_size 0 the test fold chooses (flagged)."""
    m = manifest([[0, 0, 1], [1, 1, 0], [0, 1], [1, 0, 0], [0, 1, 1]], 2)
    split = make_split(m, SplitConfig(kind="lopo", val_size=0.2))
    assert len(split.folds) == 5 and split.grouped_by == "patient" and not split.selection_on_test
    for f in split.folds:
        train, val, test = (set(m.patients[i]) for i in (f.train, f.val, f.test))
        assert len(test) == 1 and val and not (val & train) and not (val & test)
        assert len(train | val | test) == 5
    assert make_split(m, SplitConfig(kind="lopo", val_size=0.0)).selection_on_test
