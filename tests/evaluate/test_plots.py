import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure

from oncotransfer.errors import DataError
from oncotransfer.evaluate.plots import plot_confusion, plot_history, plot_risk_coverage, plot_roc, save_figure


def history(folds: int, epochs: int = 5, with_val: bool = True) -> pd.DataFrame:
    rows = []
    for f in range(folds):
        for e in range(1, epochs + 1):
            rows.append({"fold": f, "epoch": e, "train_loss": 1.0 / e + f, "train_acc": 0.5 + 0.05 * e + 0.1 * f,
                         "val_loss": 1.2 / e if with_val else np.nan, "val_acc": 0.6 if with_val else np.nan})
    return pd.DataFrame(rows)


def legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_history_single_fold_has_two_panels_and_best_epoch_line():
    fig = plot_history(history(1), best_epochs={0: 3})
    assert isinstance(fig, Figure)
    axes = fig.get_axes()
    assert len(axes) == 2
    for ax in axes:
        assert len(ax.lines) == 3  # train, validation, best epoch
        best = ax.lines[2]
        assert list(best.get_xdata()) == [3, 3] and best.get_linestyle() == "--"
        assert "best epoch" in legend_texts(ax)
    assert axes[0].get_title() == "Accuracy" and axes[1].get_title() == "Loss"


def test_history_several_folds_draws_mean_with_band():
    fig = plot_history(history(2), best_epochs={0: 2, 1: 4})
    acc = fig.get_axes()[0]
    bands = [c for c in acc.collections if isinstance(c, PolyCollection)]
    assert len(bands) == 2  # train and validation min-max bands
    train = acc.lines[0]
    # mean of fold 0 (0.5 + 0.05 e) and fold 1 (+0.1)
    assert np.allclose(train.get_ydata(), [0.55 + 0.05 * e for e in range(1, 6)])
    vlines = [ln for ln in acc.lines if ln.get_linestyle() == "--"]
    assert sorted(ln.get_xdata()[0] for ln in vlines) == [2, 4]
    assert legend_texts(acc).count("best epoch") == 1


def test_history_without_validation_draws_only_train():
    fig = plot_history(history(1, with_val=False))
    assert all(len(ax.lines) == 1 for ax in fig.get_axes())


def test_history_missing_column_raises():
    with pytest.raises(DataError, match="val_acc"):
        plot_history(history(1).drop(columns=["val_acc"]))


def test_confusion_annotates_counts_and_normalises_rows():
    cm = [[8, 2, 0], [1, 3, 0], [0, 0, 0]]
    fig = plot_confusion(cm, ["a", "b", "c"])
    ax = fig.get_axes()[0]
    assert len(fig.get_axes()) == 2  # matrix and colour bar
    assert [t.get_text() for t in ax.texts] == ["8", "2", "0", "1", "3", "0", "0", "0", "0"]
    colours = np.asarray(ax.images[0].get_array())
    assert np.allclose(colours, [[0.8, 0.2, 0], [0.25, 0.75, 0], [0, 0, 0]])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]


def test_confusion_shape_mismatch_raises():
    with pytest.raises(DataError, match="shape"):
        plot_confusion([[1, 2], [3, 4]], ["a", "b", "c"])


def test_roc_binary_one_curve_with_auc():
    p = np.array([0.1, 0.4, 0.35, 0.8])
    fig = plot_roc(np.array([0, 0, 1, 1]), np.column_stack([1 - p, p]), ["n", "p"])
    ax = fig.get_axes()[0]
    assert len(ax.lines) == 2  # curve and chance diagonal
    assert legend_texts(ax) == ["p (AUC = 0.750)"]


def test_roc_multiclass_skips_absent_class_and_accepts_names():
    prob = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.5, 0.3, 0.2], [0.1, 0.6, 0.3]])
    fig = plot_roc(["a", "b", "a", "b"], prob, ["a", "b", "c"])
    ax = fig.get_axes()[0]
    assert len(ax.lines) == 3  # a, b and the diagonal; c never occurs
    assert [t.split(" ")[0] for t in legend_texts(ax)] == ["a", "b"]


def test_roc_single_class_does_not_raise():
    fig = plot_roc(np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]]), ["n", "p"])
    ax = fig.get_axes()[0]
    assert len(ax.lines) == 1 and ax.get_legend() is None
    assert "undefined" in ax.texts[0].get_text()


def test_save_figure_writes_png_and_creates_folders(tmp_path):
    out = save_figure(plot_confusion([[1, 0], [0, 1]], ["x", "y"]), tmp_path / "a" / "b" / "cm.png")
    assert out == tmp_path / "a" / "b" / "cm.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_risk_coverage_draws_one_line_per_ordering_and_the_all_answered_level():
    cov = np.array([0.25, 0.5, 0.75, 1.0])
    fig = plot_risk_coverage({"by confidence": (cov, np.array([1.0, 1.0, 0.67, 0.5])),
                              "by OOD score": (cov, np.array([0.0, 0.5, 0.67, 0.5]))})
    ax = fig.axes[0]
    assert legend_texts(ax) == ["by confidence", "by OOD score", "all answered (0.500)"]
    np.testing.assert_allclose(ax.lines[0].get_xdata(), cov * 100)
    assert ax.get_ylim()[0] == 0.0  # a curve down to 0 stays in view
