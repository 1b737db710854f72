import json

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from oncotransfer.errors import DataError
from oncotransfer.evaluate.metrics import classification_metrics, fold_summary, summarise

OSTEO = ["Non-Tumor", "Non-Viable-Tumor", "Viable"]


def one_hot_probs(pred: list[int], n_classes: int, top: float = 0.8) -> np.ndarray:
    p = np.full((len(pred), n_classes), (1 - top) / (n_classes - 1))
    p[np.arange(len(pred)), pred] = top
    return p


def test_accuracy_per_class_and_confusion_on_hand_example():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = [0, 0, 1, 1, 2, 2]
    m = classification_metrics(y_true, one_hot_probs(y_pred, 3), ["a", "b", "c"], bootstrap=0)
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert m["per_class"]["a"] == pytest.approx({"precision": 1.0, "recall": 2 / 3, "f1": 0.8, "support": 3})
    assert m["per_class"]["b"]["precision"] == pytest.approx(0.5)
    assert m["per_class"]["b"]["recall"] == pytest.approx(0.5)
    assert m["per_class"]["c"]["precision"] == pytest.approx(0.5)
    assert m["per_class"]["c"]["recall"] == pytest.approx(1.0)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy_ci95"] is None
    assert m["binary"] is None  # three classes and no positives named
    json.dumps(m)  # must be JSON-serialisable as is


def test_binary_view_with_two_tumour_classes_reproduces_paper_numbers():
    # 10 non-tumour all right; 17 tumour images, of which one is called non-tumour.
    rows = [([0.9, 0.05, 0.05], 0)] * 10
    rows += [([0.1, 0.8, 0.1], 1)] * 6 + [([0.1, 0.2, 0.7], 1)] * 2  # NVT called Viable is still tumour
    rows += [([0.6, 0.2, 0.2], 1)]                                      # the missed tumour
    rows += [([0.05, 0.05, 0.9], 2)] * 7
    rows += [([0.45, 0.30, 0.25], 2)]  # argmax says Non-Tumor, but tumour probability sums to 0.55
    prob = np.array([r[0] for r in rows])
    y_true = np.array([r[1] for r in rows])
    m = classification_metrics(y_true, prob, OSTEO, positive_classes=["Viable", "Non-Viable-Tumor"], bootstrap=0)
    b = m["binary"]
    assert b["positive_classes"] == ["Non-Viable-Tumor", "Viable"]
    assert b["precision"] == pytest.approx(1.0)
    assert b["recall"] == pytest.approx(16 / 17)
    assert round(b["recall"], 4) == 0.9412
    assert b["specificity"] == pytest.approx(1.0)
    assert b["accuracy"] == pytest.approx(26 / 27)
    assert b["f1"] == pytest.approx(2 * 16 / 17 / (1 + 16 / 17))
    assert b["confusion_matrix"] == [[10, 0], [1, 16]]
    # The three-class view counts the argmax, so it differs from the binary one.
    assert m["confusion_matrix"] == [[10, 0, 0], [1, 6, 2], [1, 0, 7]]


def test_two_classes_default_positive_is_second_class():
    y_true = np.array([0, 0, 1, 1])
    prob = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.8, 0.2]])
    b = classification_metrics(y_true, prob, ["benign", "malignant"], bootstrap=0)["binary"]
    assert b["positive_classes"] == ["malignant"]
    assert b["confusion_matrix"] == [[1, 1], [1, 1]]
    assert b["precision"] == pytest.approx(0.5)
    assert b["specificity"] == pytest.approx(0.5)


def test_unknown_positive_class_raises_with_valid_names():
    y = np.array([0, 1, 2])
    with pytest.raises(DataError) as err:
        classification_metrics(y, one_hot_probs([0, 1, 2], 3), OSTEO, positive_classes=["Tumor"])
    assert "Tumor" in str(err.value)
    assert "Non-Viable-Tumor" in str(err.value) and "Viable" in str(err.value)


def test_every_class_positive_raises():
    with pytest.raises(DataError, match="negative"):
        classification_metrics(np.array([0, 1]), one_hot_probs([0, 1], 2), ["x", "y"], positive_classes=["x", "y"])


def test_bad_shapes_raise_data_error():
    with pytest.raises(DataError, match="shape"):
        classification_metrics(np.array([0, 1]), np.ones((2, 3)) / 3, ["x", "y"])
    with pytest.raises(DataError, match="class indices"):
        classification_metrics(np.array([0, 5]), np.ones((2, 2)) / 2, ["x", "y"])


def test_roc_auc_binary_value_and_none_for_one_class():
    prob1 = np.array([0.1, 0.4, 0.35, 0.8])
    prob = np.column_stack([1 - prob1, prob1])
    assert classification_metrics(np.array([0, 0, 1, 1]), prob, ["n", "p"], bootstrap=0)["roc_auc"] == pytest.approx(0.75)
    assert classification_metrics(np.array([1, 1, 1, 1]), prob, ["n", "p"], bootstrap=0)["roc_auc"] is None
    three = one_hot_probs([0, 1, 2, 0], 3)
    assert classification_metrics(np.array([2, 2, 2, 2]), three, OSTEO, bootstrap=0)["roc_auc"] is None


def test_multiclass_roc_auc_is_sklearn_macro_ovr_and_tolerates_absent_class():
    rng = np.random.default_rng(3)
    y = np.repeat([0, 1, 2], 20)
    prob = rng.dirichlet([1, 1, 1], size=60)
    prob[np.arange(60), y] += 0.3
    prob /= prob.sum(axis=1, keepdims=True)
    got = classification_metrics(y, prob, OSTEO, bootstrap=0)["roc_auc"]
    assert got == pytest.approx(roc_auc_score(y, prob, multi_class="ovr", average="macro"))
    # Class 2 absent: macro over the two classes that can be scored.
    keep = y < 2
    partial = classification_metrics(y[keep], prob[keep], OSTEO, bootstrap=0)["roc_auc"]
    expected = np.mean([roc_auc_score(y[keep] == k, prob[keep, k]) for k in (0, 1)])
    assert partial == pytest.approx(expected)


def test_confusion_matrix_keeps_absent_classes():
    m = classification_metrics(np.array([0, 1, 1]), one_hot_probs([0, 1, 0], 3), OSTEO, bootstrap=0)
    assert m["confusion_matrix"] == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]
    assert m["per_class"]["Viable"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}


def test_bootstrap_ci_contains_accuracy_narrows_and_is_reproducible():
    y = np.array([0, 1] * 10)
    pred = y.copy()
    pred[:6] = 1 - pred[:6]  # 14/20 right
    prob = one_hot_probs(list(pred), 2)
    small = classification_metrics(y, prob, ["n", "p"], bootstrap=500, seed=1)
    lo, hi = small["accuracy_ci95"]
    assert small["accuracy"] == pytest.approx(0.7)
    assert lo < 0.7 < hi
    big = classification_metrics(np.tile(y, 10), np.tile(prob, (10, 1)), ["n", "p"], bootstrap=500, seed=1)
    assert big["accuracy"] == pytest.approx(0.7)
    assert big["accuracy_ci95"][0] <= 0.7 <= big["accuracy_ci95"][1]
    assert big["accuracy_ci95"][1] - big["accuracy_ci95"][0] < (hi - lo) / 2
    assert classification_metrics(y, prob, ["n", "p"], bootstrap=500, seed=1)["accuracy_ci95"] == [lo, hi]


def test_summarise_t_interval_and_single_value():
    s = summarise([1.0, 2.0, 3.0])
    assert s["mean"] == pytest.approx(2.0) and s["sd"] == pytest.approx(1.0) and s["n"] == 3
    half = 4.302653 / np.sqrt(3)  # t(0.975, df=2)
    assert s["ci95"] == pytest.approx([2 - half, 2 + half], abs=1e-5)
    assert summarise([0.8]) == {"mean": 0.8, "sd": 0.0, "n": 1, "ci95": [0.8, 0.8]}
    with pytest.raises(DataError):
        summarise([])


def test_fold_summary_skips_none_and_reads_nested_keys():
    folds = [{"accuracy": 0.8, "roc_auc": None, "binary": {"recall": 0.5}},
             {"accuracy": 0.6, "roc_auc": 0.7, "binary": {"recall": 1.0}}]
    out = fold_summary(folds, keys=("accuracy", "roc_auc", "balanced_accuracy", "binary.recall"))
    assert out["accuracy"]["mean"] == pytest.approx(0.7)
    assert out["accuracy"]["sd"] == pytest.approx(np.sqrt(0.02))
    assert out["roc_auc"] == {"mean": 0.7, "sd": 0.0, "n": 1, "ci95": [0.7, 0.7]}
    assert out["balanced_accuracy"] is None
    assert out["binary.recall"]["mean"] == pytest.approx(0.75)
