"""A damaged run directory is refused in one line naming the file and how to rebuild it (issue 22):
fold files cut short or swapped, a fold of another run, temperatures 0/NaN/negative, a damaged export."""
from __future__ import annotations

import json
import shutil

import pytest

from oncotransfer.errors import CheckpointError
from oncotransfer.infer.predict import Predictor

FOLD1, FOLD2 = "checkpoint/folds/fold1.safetensors", "checkpoint/folds/fold2.safetensors"


def edit_meta(run, edit) -> None:
    path = run / "checkpoint" / "meta.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def test_meta_records_every_fold_files_digest(run_copy):
    folds = json.loads((run_copy / "checkpoint" / "meta.json").read_text())["folds"]
    assert [e["file"] for e in folds] == ["model.safetensors", "folds/fold1.safetensors", "folds/fold2.safetensors"]
    assert all(len(e["sha256"]) == 64 and e["bytes"] == (run_copy / "checkpoint" / e["file"]).stat().st_size
               for e in folds)


def test_a_fold_file_replaced_by_another_folds_is_refused(run_copy):
    """Before, the ensemble silently held fold 1's model twice."""
    shutil.copyfile(run_copy / FOLD1, run_copy / FOLD2)
    with pytest.raises(CheckpointError, match=r"fold2\.safetensors: .*(bytes where|content differs).*retrain"):
        Predictor.from_run(run_copy, "torch")


def test_another_folds_file_is_refused_by_its_own_fold_tag_without_digests(run_copy):
    """A run written before digests: the fold number in the file's own metadata still tells."""
    shutil.copyfile(run_copy / FOLD1, run_copy / FOLD2)
    edit_meta(run_copy, lambda m: [(e.pop("sha256"), e.pop("bytes")) for e in m["folds"]])
    with pytest.raises(CheckpointError, match=r"fold2\.safetensors: holds fold 1's model"):
        Predictor.from_run(run_copy, "torch")


@pytest.mark.parametrize("keep", [0, 8, 0.5])
def test_a_cut_fold_file_is_refused_in_one_line(run_copy, keep):
    data = (run_copy / FOLD1).read_bytes()
    (run_copy / FOLD1).write_bytes(data[:int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(CheckpointError, match=r"fold1\.safetensors: .*bytes where meta\.json records"):
        Predictor.from_run(run_copy, "torch")
    edit_meta(run_copy, lambda m: [(e.pop("sha256"), e.pop("bytes")) for e in m["folds"]])
    with pytest.raises(CheckpointError, match=r"fold1\.safetensors: not a readable safetensors file"):
        Predictor.from_run(run_copy, "torch")


def test_a_fold_file_of_a_run_with_other_classes_is_named(run_copy):
    """Without digests (an older run), the shape mismatch is named instead of torch's page of keys."""
    import torch
    from safetensors.torch import load_file, save_file
    t = load_file(str(run_copy / FOLD1))
    last = sorted(k for k in t if k.endswith("weight"))[-1]  # the output layer: one row per class
    bigger = {**t, last: torch.zeros(t[last].shape[0] + 1, *t[last].shape[1:])}
    save_file(bigger, str(run_copy / FOLD1), {"fold": "1"})
    edit_meta(run_copy, lambda m: [(e.pop("sha256"), e.pop("bytes")) for e in m["folds"]])
    with pytest.raises(CheckpointError, match=r"fold1\.safetensors: tensors do not fit the model"):
        Predictor.from_run(run_copy, "torch")


@pytest.mark.parametrize("value", [0.0, float("nan"), -1.0, float("inf"), "hot"])
def test_temperatures_must_be_finite_and_positive(run_copy, value):
    """0 or NaN gave empty probabilities (one class for every image), a negative one flipped the predictions."""
    edit_meta(run_copy, lambda m: m["folds"][1].update(temperature=value))
    with pytest.raises(CheckpointError, match=r"meta\.json: folds\.1\.temperature"):
        Predictor.from_run(run_copy, "torch")


@pytest.mark.parametrize("file", ["../../../etc/passwd", "/etc/passwd", "folds/fold1.safetensors"])
def test_fold_files_stay_inside_the_checkpoint_and_are_distinct(run_copy, file):
    edit_meta(run_copy, lambda m: m["folds"][2].update(file=file))
    with pytest.raises(CheckpointError, match=r"meta\.json: .*(folds|file named twice)"):
        Predictor.from_run(run_copy, "torch")


def test_a_damaged_export_is_made_again_not_loaded(run_copy):
    from oncotransfer.infer.export import export_run
    export_run(run_copy)
    onnx = run_copy / "export" / "model.onnx"
    for engine in ("auto", "onnx"):
        onnx.write_bytes(onnx.read_bytes()[:1000])
        lines: list[str] = []
        assert Predictor.from_run(run_copy, engine, log=lines.append).engine == "onnx"
        assert lines == [f"exporting the 3 fold models to {onnx} for ONNX Runtime (model.onnx differs from the "
                         "digest model.json records (damaged))"]
    (run_copy / "export" / "model.json").write_text("{garbage")
    lines = []
    assert Predictor.from_run(run_copy, "auto", log=lines.append).engine == "onnx"
    assert "its model.json is damaged" in lines[0]
    assert Predictor.from_run(run_copy, "torch").engine == "torch"


def test_a_backbone_this_installation_does_not_know_names_meta_json(run_copy):
    edit_meta(run_copy, lambda m: m["backbone"].update(name="no_such_net"))
    with pytest.raises(CheckpointError, match=r"checkpoint/meta\.json: its backbone .*'no_such_net'.*retrain"):
        Predictor.from_run(run_copy, "torch")
