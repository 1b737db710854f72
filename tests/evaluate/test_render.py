"""The one renderer: a section is one Markdown template; report.md and report.html both come from it."""
import json
import re

import jinja2
import pandas as pd
import pytest

from oncotransfer.evaluate import render, report
from oncotransfer.evaluate.render import fmt, frame_table, markdown_to_html, md_table, render_markdown
from oncotransfer.evaluate.report import evaluate_run

CLASSES = ["benign", "malignant"]


def tiny_run(root):
    """A finished two-fold run directory: run.json and predictions.csv (6 of 8 right)."""
    run = root / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"name": "tiny", "classes": CLASSES,
                                              "protocol": {"split": "kfold", "grouped_by": "patient"}}))
    truth = ["benign", "malignant"] * 4
    pred = ["benign", "malignant", "benign", "benign", "benign", "malignant", "malignant", "malignant"]
    pd.DataFrame({"fold": [0] * 4 + [1] * 4, "path": [f"{i}.png" for i in range(8)], "label": truth, "pred": pred,
                  "prob_benign": [0.8 if p == "benign" else 0.3 for p in pred],
                  "prob_malignant": [0.2 if p == "benign" else 0.7 for p in pred]}).to_csv(run / "predictions.csv",
                                                                                            index=False)
    return run


def test_one_section_template_renders_markdown_and_the_same_content_as_html(tmp_path):
    ctx = {"positives": "malignant", "rows": [("precision", "0.857"), ("TP / FP / TN / FN", "6 / 1 / 2 / 1")]}
    md = render_markdown("Report", [("run/binary.md.j2", ctx)])
    assert md == ("# Report\n\n## Binary view: malignant vs rest\n\n| metric | value |\n|---|---|\n"
                  "| precision | 0.857 |\n| TP / FP / TN / FN | 6 / 1 / 2 / 1 |\n")
    html = markdown_to_html(md, "Report", tmp_path)
    assert "<h2>Binary view: malignant vs rest</h2>" in html
    assert "<td>precision</td>\n<td>0.857</td>" in html and "<td>6 / 1 / 2 / 1</td>" in html
    assert render_markdown("Report", [("run/binary.md.j2", None)]) == "# Report\n"  # None leaves a section out


def test_a_section_added_in_one_place_appears_in_report_md_and_report_html(tmp_path, monkeypatch):
    # What a contributor writes: one template (evaluate/templates/run/per_fold.md.j2) ...
    template = "## Per-fold scores\n\n{{ md_table(['fold', 'accuracy', 'ECE'], rows) }}\n"
    monkeypatch.setattr(render.ENV, "loader", jinja2.ChoiceLoader(
        [jinja2.DictLoader({"run/per_fold.md.j2": template}), render.ENV.loader]))

    # ... and one context function, listed in report.SECTIONS where the section belongs
    def per_fold_section(r: report.ReportInputs) -> dict:
        return {"rows": [[f, fmt(m["accuracy"]), fmt(m["ece"])] for f, m in r.metrics["per_fold"].items()]}
    at = [t for t, _ in report.SECTIONS].index("run/per_class.md.j2") + 1
    monkeypatch.setattr(report, "SECTIONS", [*report.SECTIONS[:at], ("run/per_fold.md.j2", per_fold_section),
                                             *report.SECTIONS[at:]])

    run = tiny_run(tmp_path)
    metrics = evaluate_run(run)
    assert metrics["per_fold"]["0"]["accuracy"] == pytest.approx(0.75)
    md, html = (run / "report.md").read_text(), (run / "report.html").read_text()
    assert "## Per-fold scores\n\n| fold | accuracy | ECE |\n|---|---|---|\n| 0 | 0.750 |" in md
    assert "<h2>Per-fold scores</h2>" in html and "<td>0</td>\n<td>0.750</td>" in html
    for text in (md, html):  # in both, where SECTIONS put it: after the per-class scores, before the binary view
        assert text.index("Per-class scores") < text.index("Per-fold scores") < text.index("Confusion matrix")


def test_html_is_self_contained_and_escapes_raw_html(tmp_path):
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "a.png").write_bytes(b"\x89PNG fake")
    md = "# T <b>\n\n![a plot](plots/a.png)\n\n![gone](plots/gone.png)\n\n- warning <script>alert(1)</script>\n"
    html = markdown_to_html(md, "T <b>", tmp_path)
    sources = re.findall(r'src="([^"]*)"', html)
    assert sources == ["data:image/png;base64,iVBORyBmYWtl"]
    assert "[figure not found: gone.png]" in html and "plots/" not in html
    assert "<script>" not in html and "&lt;script&gt;" in html and "<title>T &lt;b&gt;</title>" in html


def test_table_cells_keep_pipes_and_settings_keep_their_digits(tmp_path):
    md = md_table(["", "a|b"], [["x", "1 | 2"]])
    assert md == "| | a\\|b |\n|---|---|\n| x | 1 \\| 2 |"
    html = markdown_to_html(md + "\n", "t", tmp_path)
    assert "<th>a|b</th>" in html and "<td>1 | 2</td>" in html  # one cell each, not a broken row
    df = pd.DataFrame({"train.lr": [1e-5, 0.01], "accuracy": [1 / 3, None]})
    assert frame_table(df, raw=["train.lr"]).splitlines()[2:] == ["| 1e-05 | 0.3333 |", "| 0.01 | n/a |"]
