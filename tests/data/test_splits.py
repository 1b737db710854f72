"""Splits never leak patients: property test over random manifests and every split kind."""
from __future__ import annotations

import re
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


def lacks_class(m: Manifest, e: DataError) -> bool:
    """The fold guard's refusal, and a true one: it names exactly the patients that hold the missing class."""
    hit = re.search(r"fold \d+'s training part has no '(c\d+)' image \(the class is held by patient\(s\) "
                    r"([^,()]+(?:, [^,()]+)*?)(?: and (\d+) more)?, all held out", str(e))
    if not hit:
        return False
    named = hit.group(2).split(", ")
    holders = sorted(set(m.patients[m.labels == int(hit.group(1)[1:])]))
    return named == holders[:len(named)] and len(named) + int(hit.group(3) or 0) == len(holders)


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
        assert (kind == "train-val-test" and "validation" in str(e)) or too_many or lacks_class(m, e), str(e)
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
        assert "groups" in str(e) or "impossible" in str(e) or lacks_class(m, e), str(e)
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


# Class and patient confounded as in the osteosarcoma tiles: class 1 only in P0/P1, class 2 only in P1/P2.
CONFOUNDED = [[0, 1, 1, 1], [0, 1, 2, 2], [0, 2, 2, 2], [0, 0, 0]]


@pytest.mark.parametrize("seed", range(8))
def test_inner_validation_keeps_every_class_in_training_when_it_can(seed):
    """lopo + val_size: holding out P1 (the only patient with both rare classes) for validation would train a fold
    without a class; the inner split picks another validation patient instead, for every seed."""
    m = manifest(CONFOUNDED, 3)
    split = make_split(m, SplitConfig(kind="lopo", val_size=0.2, seed=seed))
    assert not split.selection_on_test
    for f in split.folds:
        outer = np.union1d(f.train, f.val)
        assert set(m.labels[f.train]) == set(m.labels[outer]) == {0, 1, 2}, f"fold {f.index}"
        assert len(set(m.patients[f.val])) == 1 and not set(m.patients[f.val]) & set(m.patients[f.train])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=manifests(), grouped=st.booleans(), size=st.sampled_from([0.2, 0.25, 0.34]), seed=st.integers(0, 9))
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_inner_validation_is_unchanged_when_its_first_candidate_keeps_every_class(data, grouped, size, seed):
    """Existing runs keep their folds: where the plain first split already leaves every class in training, the
    class-preserving inner split returns exactly it; otherwise it returns a split that keeps every class, or
    (when none does) the plain one."""
    from oncotransfer.data.splits import _holdout, _inner_val
    m, _ = data
    train = np.arange(len(m))[::-1][: max(4, len(m) * 3 // 4)][::-1]  # a fold's training part: a sorted subset
    y, groups = m.labels, (np.unique(m.patients, return_inverse=True)[1] if grouped else None)
    g = None if groups is None else groups[train]
    assume(g is None or len(np.unique(g)) >= 2)
    try:
        a, b = _holdout(y[train], g, size, seed)
    except ValueError:
        assert _inner_val(train, y, groups, size, seed)[1] is None
        return
    tr, va = _inner_val(train, y, groups, size, seed)
    if set(y[train[a]]) == set(y[train]):
        assert np.array_equal(tr, train[a]) and np.array_equal(va, train[b])
    elif not np.array_equal(tr, train[a]):
        assert set(y[tr]) == set(y[train])
    assert sorted(np.concatenate([tr, va]).tolist()) == train.tolist()
    if groups is not None:
        assert not set(groups[tr]) & set(groups[va])


def test_kfold_folds_of_a_set_whose_classes_survive_are_unchanged():
    """Pinned indices of a 2-class patient-grouped 3-fold split whose first inner candidates keep both classes:
    the class-preserving selection must not move them (existing runs keep their numbers)."""
    m = manifest([[0, 1], [1, 1], [0, 0], [1, 0], [0, 1, 1], [0], [1], [0, 0, 1]], 2)
    split = make_split(m, SplitConfig(kind="kfold", folds=3, val_size=0.25, seed=0))
    got = [(f.train.tolist(), f.val.tolist(), f.test.tolist()) for f in split.folds]
    assert got == PINNED_KFOLD


PINNED_KFOLD = [  # computed by the code before the class-preserving inner split
    ([0, 1, 2, 3, 6, 7, 11, 12], [13, 14, 15], [4, 5, 8, 9, 10]),
    ([0, 1, 4, 5, 12, 13, 14, 15], [8, 9, 10], [2, 3, 6, 7, 11]),
    ([2, 3, 6, 7, 8, 9, 10, 11], [4, 5], [0, 1, 12, 13, 14, 15])]


def test_a_fold_training_without_a_class_is_one_line_naming_fold_class_and_patients():
    # class 2 only in P3: the lopo fold that tests P3 could never learn it
    m = manifest([[0, 1], [1, 0], [0, 1], [2, 2, 0]], 3)
    with pytest.raises(DataError) as e:
        make_split(m, SplitConfig(kind="lopo", val_size=0.2))
    msg = str(e.value)
    assert "\n" not in msg
    assert "fold 3's training part has no 'c2' image" in msg and "patient(s) P3" in msg
    assert msg.endswith("try more patients of that class")  # P3 is the test patient: no setting helps
    # 2-fold, patient-grouped: only a larger training part (more folds) or another assignment helps
    with pytest.raises(DataError, match=r"fold \d's training part has no 'c2' image.*try more split.folds, another "
                                        r"split.seed or more patients of that class$"):
        make_split(m, SplitConfig(kind="kfold", folds=2, val_size=0.0))
    # no patient ids: the holders are near-duplicate groups, or images
    m = manifest([[0, 1, 0, 1, 0, 1, 0, 1, 2, 2]], 3)
    m.patients = None
    dup = np.arange(len(m))
    dup[9] = 8  # the two class-2 images are near-duplicates: one group, so one fold tests both
    cfg = SplitConfig(kind="kfold", folds=2, val_size=0.0, group_by_patient=False, allow_image_level_split=True)
    with pytest.raises(DataError, match=r"no 'c2' image \(the class is held by 1 duplicate group\(s\) of 2 image"
                                        r"\(s\).*try more split.folds, another split.seed or more images of"):
        make_split(m, cfg, dup)
    m2 = manifest([[0, 1, 0, 1, 0, 1, 2]], 3)
    m2.patients = None
    with pytest.raises(DataError, match=r"no 'c2' image \(the class is held by 1 image\(s\)"):
        make_split(m2, cfg.model_copy(update={"group_duplicates": False}))


def test_lopo_warns_about_classes_held_by_two_patients_or_fewer():
    m = manifest(CONFOUNDED, 3)
    warnings = make_split(m, SplitConfig(kind="lopo", val_size=0.2)).warnings
    rare = [w for w in warnings if "comes from only" in w]
    assert len(rare) == 2
    assert "'c1' comes from only 2 patient(s) (P0, P1)" in rare[0] and "'c2'" in rare[1] and "(P1, P2)" in rare[1]
    assert not any("comes from only" in w for w in make_split(m, SplitConfig(kind="kfold", folds=2, val_size=0.0,
                                                                            seed=0)).warnings)


OSTEO = [Path(__file__).resolve().parents[2].parent / "shared" / "data" / "osteosarcoma-tcia-60", "demo:osteosarcoma"]


@pytest.mark.parametrize("path", OSTEO, ids=["shared", "demo"])
def test_osteosarcoma_lopo_trains_every_fold_on_every_class(path):
    """The real confounded tiles (Non-Viable-Tumor only in Case-3/Case-4, Viable only in Case-4/Case-48): with a
    patient-level inner validation split every fold still trains on all three classes, and both rare classes are
    warned about."""
    from oncotransfer.data.manifest import load_manifest
    if isinstance(path, Path) and not (path / "manifest.csv").is_file():
        pytest.skip("../shared/data is absent")
    m = load_manifest(path)
    for seed in range(4):
        split = make_split(m, SplitConfig(kind="lopo", group_by_patient=True, val_size=0.2, seed=seed))
        assert len(split.folds) == 4 and not split.selection_on_test
        for f in split.folds:
            assert set(m.labels[f.train]) == {0, 1, 2}, f"seed {seed} fold {f.index}"
    rare = [w for w in split.warnings if "comes from only" in w]
    assert [w.split("'")[1] for w in rare] == ["Non-Viable-Tumor", "Viable"]
    assert "(Case-3, Case-4)" in rare[0] and "(Case-4, Case-48)" in rare[1]
