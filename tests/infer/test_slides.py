"""Slide-level prediction and metrics: a run trained on tiles cut by ``slides tile``, then whole slides streamed
through its ONNX export (probabilities equal to scoring the written tiles), heatmaps, mean / top-k scores."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from oncotransfer.errors import ConfigError
from oncotransfer.evaluate.slides import aggregate, parse_aggregate, slide_metrics
from slidegen import Mosaic, stain_images, write_slide

LAYOUT = np.array([[-1, 0, 1, -1], [0, 1, -1, -1], [-1, -1, -1, 0]])  # 5 stained cells of 256 px: 20 tiles


@pytest.fixture(scope="module")
def slide_run(tmp_path_factory):
    """Six slides (three per class, the classes differ in stain), tiled at 64 px / 0.5 µm/px, and a frozen
    offline Lite0 (32 px input, so tiles are resized as in training) trained on the tiles with a 3-fold split
    grouped by slide, a validation slide in each fold (so the out-of-distribution detector has a threshold)."""
    from oncotransfer.config import validate
    from oncotransfer.data.slides import tile_slides
    from oncotransfer.evaluate.report import evaluate_run
    from oncotransfer.experiments.run import run_experiment
    tmp = tmp_path_factory.mktemp("slide_run")
    (tmp / "slides").mkdir()
    rows = []
    for k in range(6):  # each slide its own nuclei, so no tile is a near-duplicate of another slide's
        cls = "tumour" if k % 2 else "normal"
        base = stain_images(4, 256, seed=k)
        images = base[1::2] if k % 2 else base[::2]
        write_slide(tmp / "slides" / f"s{k}.tif", Mosaic(images, LAYOUT, 256), 1024, 768, mpp=0.25, levels=3)
        rows.append(f"s{k},{cls}\n")
    (tmp / "labels.csv").write_text("slide,label\n" + "".join(rows))
    tile_slides(tmp / "slides", tmp / "tiles", tile_size=64, labels=tmp / "labels.csv")
    cfg = validate({
        "name": "slides", "output_dir": str(tmp / "runs"), "data": {"path": str(tmp / "tiles"), "image_size": 32},
        "split": {"kind": "kfold", "folds": 3, "val_size": 0.25},
        "model": {"backbone": "efficientnet_lite0", "weights": "efficientnet_lite0_packaged", "freeze": "frozen"},
        "train": {"epochs": 2, "cache_dir": str(tmp / "cache"), "num_workers": 1, "feature_engine": "torch"},
        "evaluate": {"bootstrap": 0},
    }, "slide_run fixture")
    run = run_experiment(cfg, report=False).run_dir
    evaluate_run(run, plots=False)
    return tmp, run


def test_aggregate_mean_topk_and_bad_specs():
    classes = ["normal", "tumour"]
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.7, 0.3]])
    assert aggregate(p, classes, "mean") == pytest.approx([0.625, 0.375])
    # top-2 ranks tiles by the positive class (tumour): tiles 2 and 3
    assert aggregate(p, classes, "topk:2") == pytest.approx([0.4, 0.6])
    assert aggregate(p, classes, "topk:99") == pytest.approx(p.mean(0))  # K beyond the tiles: all of them
    three = ["a", "b", "c"]
    q = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    s = aggregate(q, three, "topk:1")  # no positive class: each class's own top-1, renormalised
    assert s == pytest.approx(np.array([0.8, 0.8, 0.6]) / 2.2)
    assert parse_aggregate("topk:5") == ("topk", 5)
    for bad in ("median", "topk:0", "topk:x"):
        with pytest.raises(ConfigError, match="mean or topk:K"):
            parse_aggregate(bad)


def test_slide_metrics_are_computed_per_slide_not_per_tile():
    df = pd.DataFrame({"fold": 0, "slide": ["A"] * 3 + ["B"] * 2, "label": ["x"] * 3 + ["y"] * 2,
                       "prob_x": [0.9, 0.8, 0.2, 0.6, 0.7], "prob_y": [0.1, 0.2, 0.8, 0.4, 0.3]})
    m = slide_metrics(df, ["x", "y"], bootstrap=0)
    assert m["slides"] == 2 and m["pooled"]["n"] == 2
    assert m["pooled"]["accuracy"] == 0.5  # A: mean 0.633 x (right); B: mean 0.65 x (wrong)
    assert slide_metrics(df.drop(columns="slide"), ["x", "y"]) is None


def test_training_on_tiles_reports_slide_level_metrics_beside_tile_level(slide_run):
    tmp, run = slide_run
    metrics = json.loads((run / "metrics.json").read_text())
    slides = metrics["slides"]
    assert slides["slides"] == 6 and slides["pooled"]["n"] == 6 and slides["aggregate"] == "mean"
    assert metrics["pooled"]["n"] == 120  # tile level: every tile tested once over the 3 folds
    # Recompute independently: each slide's mean tile probability against its label.
    preds = pd.read_csv(run / "predictions.csv")
    preds["slide"] = preds["path"].str.extract(r"tiles/(s\d)/")[0]
    per = preds.groupby("slide").agg(label=("label", "first"), p=("prob_tumour", "mean"))
    expected = float(((per.p >= 0.5) == (per.label == "tumour")).mean())
    assert slides["pooled"]["accuracy"] == pytest.approx(expected)
    table = pd.read_csv(run / "slide_predictions.csv")
    assert sorted(table.slide) == [f"s{k}" for k in range(6)] and (table.tiles == 20).all()
    # every slide's tiles sit in one test fold (grouped by slide)
    assert preds.groupby("slide")["fold"].nunique().max() == 1


def test_evaluate_cli_topk_and_report_headline(slide_run, monkeypatch, capsys):
    from test_cli import run_main
    _, run = slide_run
    code, out, _ = run_main(monkeypatch, capsys, "evaluate", str(run), "--aggregate", "topk:3")
    assert code == 0 and "slide-level accuracy" in out and "3 tiles most likely tumour" in out
    assert "Slide-level accuracy (mean probabilities of the 3 tiles" in (run / "report.md").read_text()
    assert json.loads((run / "metrics.json").read_text())["slides"]["aggregate"] == "topk:3"


def test_predict_slide_streams_the_same_probabilities_as_the_training_tiles(slide_run, tmp_path):
    from oncotransfer.infer.predict import Predictor
    from oncotransfer.infer.slides import predict_slides
    tmp, run = slide_run
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00" + b"\x00" * 64)
    out = tmp_path / "pred" / "slides.csv"
    summary, errors = predict_slides(run, [str(tmp / "slides" / "s1.tif"), str(bad)], out, "topk:4")
    assert list(errors) == [str(bad)] and "not a slide" in errors[str(bad)]
    assert (run / "export" / "model.onnx").is_file()  # exported on first use, parity-checked
    row = summary.iloc[0]
    assert (row["slide"], row["tiles"], row["aggregate"]) == ("s1", 20, "topk:4")
    tiles = pd.read_csv(tmp_path / "pred" / "slides_slides" / "s1_tiles.csv")
    assert len(tiles) == 20 and np.allclose(tiles[["prob_normal", "prob_tumour"]].sum(axis=1), 1, atol=1e-5)
    top = tiles.nlargest(4, "prob_tumour")
    assert row.prob_tumour == pytest.approx(top.prob_tumour.mean(), abs=1e-6)
    assert tiles.in_distribution.all() and row.ood_tiles == 0  # a slide of the training set
    # The streamed tiles are the training tiles: same pixels, same probabilities.
    pred = Predictor.from_run(run, "onnx")
    files = [tmp / "tiles" / "tiles" / "s1" / f"s1_x{x}_y{y}.png" for x, y in zip(tiles.x, tiles.y)]
    df, errs = pred.predict_paths(files)
    assert not errs
    assert np.abs(df["prob_tumour"].to_numpy() - tiles["prob_tumour"].to_numpy()).max() < 1e-5
    assert df["ood_score"].to_numpy() == pytest.approx(tiles["ood_score"].to_numpy(), rel=1e-5)
    heat = Image.open(tmp_path / "pred" / "slides_slides" / "s1_heatmap.png")
    assert heat.width > 300 and heat.height > 200


def test_predict_slide_cli_writes_outputs_and_rejects_a_bad_aggregate(slide_run, tmp_path, monkeypatch, capsys):
    from test_cli import assert_one_line_error, run_main
    tmp, run = slide_run
    out = tmp_path / "s.csv"
    code, stdout, stderr = run_main(monkeypatch, capsys, "predict", str(run), str(tmp / "slides" / "s0.tif"),
                                    "--slide", "--out", str(out))
    assert code == 0 and "1 slide(s)" in stdout and "0% of tiles out of distribution" in stderr
    s = pd.read_csv(out)
    assert list(s.slide) == ["s0"] and s.pred[0] in ("normal", "tumour")
    assert (tmp_path / "s_slides" / "s0_heatmap.png").is_file()
    code, _, err = run_main(monkeypatch, capsys, "predict", str(run), str(tmp / "slides"), "--slide",
                            "--aggregate", "max", "--out", str(out))
    assert_one_line_error(code, err, "mean or topk:K")


def test_predict_slide_flags_the_tiles_unlike_the_training_tiles(slide_run, tmp_path):
    """A slide with two cells of new synthetic stain (like training) and two of real osteosarcoma H&E (never
    seen): exactly the tiles on the H&E cells are out of distribution, and the summary gives their share."""
    from oncotransfer.data.demo import demo_path
    from oncotransfer.infer.slides import predict_slides
    _, run = slide_run
    real = [np.asarray(Image.open(p).convert("RGB").resize((256, 256)))
            for p in sorted(demo_path("osteosarcoma").rglob("*.jpg"))[:2]]
    layout = np.array([[-1, 0, 1, -1], [2, 3, -1, -1], [-1, -1, -1, 0]])  # 2, 3: the real H&E cells
    write_slide(tmp_path / "mixed.tif", Mosaic(stain_images(4, 256, seed=11)[::2] + real, layout, 256), 1024, 768,
                mpp=0.25, levels=3)
    said: list[str] = []
    summary, errors = predict_slides(run, [str(tmp_path / "mixed.tif")], tmp_path / "s.csv", log=said.append)
    assert not errors
    tiles = pd.read_csv(tmp_path / "s_slides" / "mixed_tiles.csv")
    unseen = np.array([layout[y // 256, x // 256] >= 2 for x, y in zip(tiles.x, tiles.y)])
    assert 0 < unseen.sum() < len(tiles)
    assert (tiles.in_distribution.to_numpy() == ~unseen).all()
    threshold = json.loads((run / "export" / "model.json").read_text())["ood"]["threshold"]
    assert (tiles.ood_score[unseen] > threshold).all() and (tiles.ood_score[~unseen] <= threshold).all()
    share = unseen.mean()
    assert summary.ood_tiles[0] == pytest.approx(share)
    assert pd.read_csv(tmp_path / "s.csv").ood_tiles[0] == pytest.approx(share)
    assert f"{100 * share:.0f}% of tiles out of distribution" in said[-1]


def test_ood_share_counts_flagged_tiles_and_says_when_there_is_no_threshold():
    from oncotransfer.infer.slides import _ood_share
    flags = pd.DataFrame({"in_distribution": pd.Series([True] * 199 + [False], dtype=object)})
    share, line = _ood_share(flags, "s.tif: 200 tiles")
    assert share == 0.005 and line == "s.tif: 200 tiles; 0% of tiles out of distribution (1 of 200)"
    share, line = _ood_share(pd.DataFrame({"in_distribution": pd.Series([None, None], dtype=object)}), "s")
    assert np.isnan(share) and "threshold not set" in line


def test_export_from_before_the_detector_is_stale_and_made_again(slide_run, tmp_path):
    """An export without the ``ood_score`` output while the run has a detector would stream without the check:
    ``tile_model`` exports again. A run without any detector streams probabilities alone."""
    import shutil
    from oncotransfer.infer.slides import predict_slides, tile_model
    tmp, slide_src = slide_run
    run = tmp_path / "run"
    shutil.copytree(slide_src, run)
    tile_model(run)
    info_path = run / "export" / "model.json"
    info = json.loads(info_path.read_text())
    assert info["ood"]["output"] == "ood_score"
    info_path.write_text(json.dumps({k: v for k, v in info.items() if k != "ood"}))  # as exports were before
    m = tile_model(run)
    assert json.loads(info_path.read_text())["ood"]["tensors_sha256"] == info["ood"]["tensors_sha256"]
    assert m.ood_output == "ood_score" and m.ood_threshold == pytest.approx(info["ood"]["threshold"])
    for name in ("ood.json", "ood.safetensors"):  # a run trained before detectors existed
        (run / "checkpoint" / name).unlink()
    m = tile_model(run)
    assert m.ood_output is None and json.loads(info_path.read_text())["ood"] is None
    summary, _ = predict_slides(run, [str(tmp / "slides" / "s0.tif")], tmp_path / "s.csv")
    assert "ood_tiles" not in summary.columns
    assert "ood_score" not in pd.read_csv(tmp_path / "s_slides" / "s0_tiles.csv").columns


def test_streaming_needs_no_pytorch(slide_run):
    """The slide scorer runs the export with ONNX Runtime alone: importing torch would cost ~1 GB of RSS."""
    import subprocess
    import sys
    from oncotransfer.infer.slides import tile_model
    _, run = slide_run
    tile_model(run)  # exports if no earlier test did
    code = ("import sys; from oncotransfer.infer.slides import tile_model; m = tile_model(sys.argv[1]); "
            "import numpy as np; p, s = m.outputs(m.normalised(np.zeros((2, m.size, m.size, 3), np.uint8))); "
            "assert p.shape == (2, 2) and s.shape == (2,) and m.ood_threshold is not None; "
            "assert 'torch' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code, str(run)], check=True, timeout=120)


def test_evaluate_on_other_slide_tiles_gives_slide_metrics(slide_run):
    """``evaluate RUN --data TILES``: the external tiles' manifest brings its slide column."""
    from oncotransfer.infer.external import evaluate_on
    tmp, run = slide_run
    metrics = evaluate_on(run, str(tmp / "tiles"), engine="torch")
    assert metrics["slides"]["slides"] == 6 and metrics["pooled"]["n"] == 120
    assert (run / "slide_predictions_report_external.csv").is_file()


REAL = Path(__file__).parents[2].parent / "shared" / "data" / "real-files"
real = pytest.mark.skipif(not REAL.is_dir(), reason="../shared/data/real-files is absent")


@real
def test_predict_slide_on_a_corrupt_slide_is_one_line_and_a_folder_goes_on(slide_run, tmp_path, monkeypatch,
                                                                           capsys):
    import shutil
    from test_cli import assert_one_line_error, run_main
    tmp, run = slide_run
    bad = tmp_path / "in" / "unreadable.svs"
    bad.parent.mkdir()
    shutil.copy(REAL / "slides" / "openslide-fixtures" / "unreadable.svs", bad)
    # 16 px tiles at the fixture's own 0.499 µm/px: one tile fits, so its corrupt pixels are read
    opts = ["--slide", "--tile-size", "16", "--mpp", "0.499", "--out", str(tmp_path / "p.csv")]
    code, _, err = run_main(monkeypatch, capsys, "predict", str(run), str(bad), *opts)
    assert_one_line_error(code, err, "unreadable.svs", "cannot read its thumbnail", "Bogus marker length")
    shutil.copy(tmp / "slides" / "s0.tif", bad.parent / "s0.tif")
    code, out, err = run_main(monkeypatch, capsys, "predict", str(run), str(bad.parent), *opts)
    assert code == 1 and "Traceback" not in err and "1 slide(s)" in out
    assert f"failed: {bad}: cannot read its thumbnail (OpenSlideError: Bogus marker length)" in err
    assert list(pd.read_csv(tmp_path / "p.csv").slide) == ["s0"]


@real
def test_predict_slide_on_a_slide_smaller_than_a_tile_fails(slide_run, tmp_path, monkeypatch, capsys):
    from test_cli import assert_one_line_error, run_main
    _, run = slide_run
    small = REAL / "slides" / "openslide-fixtures" / "small.svs"
    code, _, err = run_main(monkeypatch, capsys, "predict", str(run), str(small), "--slide",
                            "--out", str(tmp_path / "p.csv"))
    assert_one_line_error(code, err, "small.svs", "16 x 16 px is smaller than one 64 px tile")


def test_predict_slide_warns_when_tiles_are_cut_at_another_resolution_than_training(slide_run, tmp_path):
    from oncotransfer.infer.slides import predict_slides
    tmp, run = slide_run
    said: list[str] = []
    predict_slides(run, [str(tmp / "slides" / "s0.tif")], tmp_path / "a.csv", log=said.append)
    assert not [s for s in said if s.startswith("warning")]  # training's 0.5 µm/px by default
    assert "brightfield tissue mask" in said[-1]
    predict_slides(run, [str(tmp / "slides" / "s0.tif")], tmp_path / "b.csv", mpp=1.0, log=said.append)
    warnings = [s for s in said if s.startswith("warning")]
    assert len(warnings) == 1 and "1 µm/px" in warnings[0] and "trained on tiles at 0.5 µm/px" in warnings[0]


def test_predict_slide_cli_runs_without_pytorch_under_1_gib(slide_run, tmp_path):
    """The whole ``predict --slide`` command, as a user runs it, in a fresh process: torch never imported, and
    the process's peak RSS (VmHWM: ru_maxrss would include the forking parent's pages) under 1 GiB."""
    import os
    import subprocess
    import sys
    from oncotransfer.infer.slides import tile_model
    tmp, run = slide_run
    tile_model(run)  # the export exists first: making it needs torch, scoring must not
    code = ("import sys\n"
            "sys.argv = ['oncotransfer'] + sys.argv[1:]\n"
            "from oncotransfer import cli\n"
            "try:\n    cli.main()\n    rc = 0\n"
            "except SystemExit as e:\n    rc = 0 if e.code is None else e.code\n"
            "finally:\n"
            "    hwm = [ln.split()[1] for ln in open('/proc/self/status') if ln.startswith('VmHWM:')][0]\n"
            "    print('RESULT', rc, 'torch' in sys.modules, int(hwm) * 1024)\n")
    src = str(Path(__file__).parents[2] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code, "predict", str(run), str(tmp / "slides" / "s0.tif"),
                           "--slide", "--out", str(tmp_path / "s.csv")], env=env, capture_output=True, text=True,
                          timeout=300)
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT")][-1].split()
    assert line[1] == "0", done.stderr
    assert line[2] == "False"  # torch not in sys.modules
    assert int(line[3]) < 2 ** 30
    assert list(pd.read_csv(tmp_path / "s.csv").slide) == ["s0"]
