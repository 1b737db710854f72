import json
import re

import numpy as np
import pandas as pd
import pytest
import yaml

from oncotransfer.errors import CheckpointError, DataError
from oncotransfer.evaluate.compare import write_comparison
from oncotransfer.evaluate.report import evaluate_run, schedule_line

CLASSES = ["Non-Tumor", "Non-Viable-Tumor", "Viable"]
NT, NVT, V = CLASSES
# fold 0: 4 of 5 right; fold 1: 3 of 5 right -> pooled 7/10
FOLDS = {0: ([NT, NT, NVT, V, V], [NT, NVT, NVT, V, V]),
         1: ([NT, NVT, NVT, V, V], [NT, NT, V, V, V])}


def predictions() -> pd.DataFrame:
    rows = []
    for fold, (labels, preds) in FOLDS.items():
        for i, (label, pred) in enumerate(zip(labels, preds)):
            probs = {f"prob_{c}": 0.8 if c == pred else 0.1 for c in CLASSES}
            rows.append({"fold": fold, "path": f"f{fold}/img{i}.png", "label": label, "pred": pred, **probs})
    return pd.DataFrame(rows)


def make_run(root, image_level=True, positive=(NVT, V), selection_on_test=True, write_predictions=True):
    run = root / "run"
    run.mkdir()
    protocol = {"split": "kfold", "grouped_by": None if image_level else "patient", "image_level": image_level,
                "selection_on_test": selection_on_test, "augment": "offline (3 copies)", "zoom_mode": "keras",
                "feature_cache": "features"}
    (run / "run.json").write_text(json.dumps({
        "name": "osteo-paper", "classes": CLASSES, "protocol": protocol, "best_epochs": {"0": 3, "1": 4},
        "seconds": 125.0, "device": "cpu", "precision": "bf16+channels_last",
        "weights": "efficientnet_lite0_packaged", "warnings": ["few images per patient <check>"]}))
    cfg = {"name": "osteo-paper", "data": {"path": "/data/osteo"}, "split": {"kind": "kfold", "folds": 2},
           "model": {"backbone": "efficientnet_lite0", "weights": "imagenet", "head": {"kind": "paper_dense"},
                     "freeze": "frozen"},
           "augment": {"mode": "offline"}, "train": {"epochs": 5},
           "evaluate": {"positive_classes": list(positive) if positive else None, "bootstrap": 200}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    hist = [{"fold": f, "epoch": e, "train_loss": 1 / e, "train_acc": 0.5 + 0.1 * e, "val_loss": 1.1 / e,
             "val_acc": 0.45 + 0.1 * e, "lr": 1e-3, "seconds": 1.0} for f in range(2) for e in range(1, 6)]
    pd.DataFrame(hist).to_csv(run / "history.csv", index=False)
    if write_predictions:
        predictions().to_csv(run / "predictions.csv", index=False)
    return run


def test_evaluate_run_writes_metrics_with_hand_computed_numbers(tmp_path):
    run = make_run(tmp_path)
    returned = evaluate_run(run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(returned))
    assert metrics["classes"] == CLASSES
    assert metrics["protocol"]["image_level"] is True
    assert metrics["pooled"]["n"] == 10
    assert metrics["pooled"]["accuracy"] == pytest.approx(0.7)
    assert set(metrics["per_fold"]) == {"0", "1"}
    assert metrics["per_fold"]["0"]["accuracy"] == pytest.approx(0.8)
    assert metrics["per_fold"]["1"]["accuracy"] == pytest.approx(0.6)
    assert metrics["folds"]["accuracy"]["mean"] == pytest.approx(0.7)
    assert metrics["folds"]["accuracy"]["sd"] == pytest.approx(np.sqrt(0.02))
    lo, hi = metrics["pooled"]["accuracy_ci95"]
    assert lo <= 0.7 <= hi
    binary = metrics["pooled"]["binary"]
    assert binary["confusion_matrix"] == [[2, 1], [1, 6]]
    assert binary["precision"] == pytest.approx(6 / 7) and binary["recall"] == pytest.approx(6 / 7)
    assert metrics["pooled"]["confusion_matrix"] == [[2, 1, 0], [1, 1, 1], [0, 0, 4]]
    for name in ("history", "confusion", "roc", "confusion_binary"):
        assert (run / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_report_md_flags_image_level_split(tmp_path):
    run = make_run(tmp_path, image_level=True)
    evaluate_run(run)
    md = (run / "report.md").read_text()
    assert "osteo-paper" in md.splitlines()[0]
    assert "IMAGE-LEVEL" in md and "use group_by_patient" in md
    assert "optimistic, as in the published study" in md
    assert "0.700 (95% CI" in md
    assert "Non-Viable-Tumor + Viable" in md
    assert "few images per patient <check>" in md
    assert "efficientnet_lite0_packaged" in md and "bf16+channels_last" in md and "2 min 05 s" in md
    assert "backbone: efficientnet_lite0" in md  # the config section
    assert "- **LR schedule**: constant lr 0.001\n" in md  # a config without schedule keys: the defaults
    assert "![Training history](plots/history.png)" in md


def test_report_without_image_level_split_has_no_warning(tmp_path):
    run = make_run(tmp_path, image_level=False, selection_on_test=False)
    evaluate_run(run)
    md = (run / "report.md").read_text()
    html = (run / "report.html").read_text()
    assert "IMAGE-LEVEL" not in md and "IMAGE-LEVEL" not in html
    assert "Grouped by patient" in md
    assert "optimistic" not in md
    assert "Best epoch selected on an inner patient-level validation split" in md


def test_report_html_is_self_contained(tmp_path):
    run = make_run(tmp_path)
    evaluate_run(run)
    html = (run / "report.html").read_text()
    # history, confusion, binary confusion, ROC, reliability, selective prediction
    assert html.count("data:image/png;base64,") == 6
    sources = re.findall(r'src="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "href" not in html and "<link" not in html and "http" not in html and "plots/" not in html
    assert "IMAGE-LEVEL" in html
    assert "&lt;check&gt;" in html and "<check>" not in html  # run warnings are escaped
    assert '"Segoe UI"' in html  # ...but the stylesheet is not


def test_every_report_has_selective_prediction_with_and_without_an_ood_score(tmp_path):
    run = make_run(tmp_path)
    metrics = evaluate_run(run)
    sel = metrics["selective"]
    # 10 rows, every confidence 0.8 (one tie): any share answered is expected to be 7/10 right
    assert sel["confidence"] == "top probability" and sel["accuracy_by_ood"] is None
    assert sel["accuracy_by_confidence"] == pytest.approx([0.7] * 20) and sel["accuracy_at_90_coverage"] == 0.7
    md = (run / "report.md").read_text()
    assert "## Selective prediction" in md and "**Accuracy at 90% coverage**: 0.700" in md
    assert "accuracy by OOD score" not in md and (run / "plots" / "selective.png").read_bytes()[:4] == b"\x89PNG"
    assert "![Selective prediction (risk-coverage)](plots/selective.png)" in md
    # with an ood_score column (higher = more unusual) the images are also answered most usual first
    frame = predictions()
    frame["ood_score"] = np.where(frame["label"] == frame["pred"], 0.0, 1.0)  # the 3 wrong ones are unusual
    metrics = evaluate_run(run, predictions=frame, out_name="external")
    by_ood = metrics["selective"]["accuracy_by_ood"]
    assert by_ood[metrics["selective"]["coverage"].index(0.7)] == 1.0 and by_ood[-1] == pytest.approx(0.7)
    assert metrics["selective"]["accuracy_at_90_coverage_by_ood"] == pytest.approx(7 / 9)
    md = (run / "external.md").read_text()
    assert "accuracy by OOD score" in md and (run / "plots" / "selective_external.png").is_file()


def test_ece_has_a_bootstrap_interval_in_metrics_and_headline(tmp_path):
    run = make_run(tmp_path)
    metrics = evaluate_run(run)
    lo, hi = metrics["pooled"]["ece_ci95"]
    assert metrics["calibration"]["ece_before_ci95"] == [lo, hi] and 0 <= lo <= hi <= 1
    assert metrics["calibration"]["ece_after_ci95"] is None  # no cal_prob columns
    assert f"(95% CI {lo:.3f}–{hi:.3f})" in (run / "report.md").read_text()


def test_no_binary_view_without_positive_classes_for_three_classes(tmp_path):
    run = make_run(tmp_path, positive=None)
    metrics = evaluate_run(run)
    assert metrics["pooled"]["binary"] is None
    assert not (run / "plots" / "confusion_binary.png").exists()
    assert "Binary view" not in (run / "report.md").read_text()


def test_unknown_positive_class_in_config_raises(tmp_path):
    run = make_run(tmp_path, positive=("Tumour",))
    with pytest.raises(DataError, match="Tumour"):
        evaluate_run(run)


def test_missing_predictions_or_run_json_raise_checkpoint_error(tmp_path):
    run = make_run(tmp_path, write_predictions=False)
    with pytest.raises(CheckpointError, match="predictions.csv") as err:
        evaluate_run(run)
    assert str(run) in str(err.value) and "train" in str(err.value)
    with pytest.raises(CheckpointError, match="run.json"):
        evaluate_run(tmp_path / "nowhere")


def test_given_predictions_with_out_name_do_not_overwrite_run_outputs(tmp_path):
    run = make_run(tmp_path, write_predictions=False)
    frame = predictions()
    frame = frame[frame["fold"] == 0]
    metrics = evaluate_run(run, predictions=frame, out_name="external")
    assert metrics["pooled"]["accuracy"] == pytest.approx(0.8)
    assert (run / "metrics_external.json").is_file() and (run / "external.html").is_file()
    assert not (run / "metrics.json").exists() and not (run / "report.md").exists()


def test_write_comparison_side_by_side(tmp_path):
    run = make_run(tmp_path)
    multistage = evaluate_run(run)
    direct_frame = predictions()
    direct_frame.loc[direct_frame.index[:2], [f"prob_{c}" for c in CLASSES]] = [0.1, 0.1, 0.8]
    direct = evaluate_run(run, predictions=direct_frame, out_name="direct")
    out = write_comparison(run, [("multistage", multistage, predictions()), ("direct", direct, direct_frame)])
    assert out == run / "comparison.html"
    md = (run / "comparison.md").read_text()
    assert "| | multistage | direct |" in md
    acc_row = next(line for line in md.splitlines() if line.startswith("| Accuracy [95% CI]"))
    assert f"{multistage['pooled']['accuracy']:.3f}" in acc_row and f"{direct['pooled']['accuracy']:.3f}" in acc_row
    assert multistage["pooled"]["accuracy"] != direct["pooled"]["accuracy"]
    assert "Binary recall" in md and "0.857" in md
    for name in ("roc_compare", "confusion_multistage", "confusion_direct"):
        assert (run / "plots" / f"{name}.png").is_file()
    html = out.read_text()
    assert html.count("data:image/png;base64,") == 3 and "plots/" not in html


def test_schedule_line_names_the_schedule_and_its_keys():
    cos = {"lr": 0.01, "schedule": "cosine", "warmup_epochs": 1.5, "min_lr_ratio": 0.05,
           "backbone_lr_mult": 0.1, "label_smoothing": 0.1}
    assert schedule_line(cos) == ("cosine from lr 0.01 to 0.05 × lr at the last batch, linear warm-up over "
                                  "1.5 epoch(s); backbone lr × 0.1; label smoothing 0.1")
    assert "backbone" not in schedule_line(cos, frozen=True)      # a frozen backbone has no lr to scale
    assert schedule_line({"lr": 0.01, "schedule": "onecycle", "warmup_epochs": 3}).startswith(
        "one-cycle: from lr / 25 rising linearly to lr 0.01 over 3 epoch(s)")
    assert "× 0.5 once more than 2 epoch(s)" in schedule_line({"lr": 0.01, "schedule": "plateau",
                                                              "plateau_patience": 2})
    assert schedule_line({}) == "not recorded"


def test_a_duplicate_grouped_split_without_patient_ids_is_named_as_such():
    """BUSI publishes no patient ids: the advice to group by patient cannot be followed, so it is not given."""
    from oncotransfer.evaluate.report import protocol_lines
    lines = protocol_lines({"split": "kfold", "grouped_by": "duplicates", "image_level": True,
                            "selection_on_test": False}, 5)
    text = " ".join(line["text"] for line in lines)
    assert "No patient ids in the data: grouped by near-duplicate images" in text
    assert "IMAGE-LEVEL" not in text and "use group_by_patient" not in text
    assert [line["level"] for line in lines if "near-duplicate" in line["text"]] == ["warn"]
