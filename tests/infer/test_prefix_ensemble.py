"""The fold ensemble of a last:2 run: its folds are loaded on one copy of the frozen prefix, run it once per
batch, and export to an ONNX graph with one prefix and a tail per fold."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from oncotransfer.data.demo import demo_path

IMAGES = sorted(demo_path("osteosarcoma").rglob("*.jpg"))[:6]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def last2_run(tmp_path_factory):
    """A real tiny 3-fold last:2 run (packaged Lite0, demo tiles at 64 px, 1 epoch, temperatures fitted)."""
    from oncotransfer.config import validate
    from oncotransfer.experiments.run import run_experiment
    tmp = tmp_path_factory.mktemp("last2_run")
    cfg = validate({
        "name": "last2", "output_dir": str(tmp / "runs"),
        "data": {"path": "demo:osteosarcoma", "image_size": 64},
        "split": {"kind": "kfold", "folds": 3, "val_size": 0.25, "allow_image_level_split": True,
                  "group_by_patient": False},
        "model": {"backbone": "efficientnet_lite0", "weights": "efficientnet_lite0_packaged", "freeze": "last:2"},
        "train": {"epochs": 1, "cache_dir": str(tmp / "cache"), "num_workers": 0, "feature_engine": "torch",
                  "fast_cpu": False},
        "evaluate": {"bootstrap": 0}}, "last2_run fixture")
    return run_experiment(cfg, report=False).run_dir


@pytest.fixture
def last2_copy(last2_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(last2_run, run)
    return run


def pil_images() -> list[Image.Image]:
    return [Image.open(p) for p in IMAGES]


def test_folds_load_on_one_frozen_prefix_and_run_it_once(last2_run):
    from oncotransfer.infer.predict import Predictor
    ens = Predictor.from_run(last2_run, engine="torch")
    members = ens.ensemble.members
    b0 = members[0].backbone
    for m in members[1:]:  # one copy of the frozen stages in memory; the trained ones are each fold's own
        assert m.backbone.conv_stem is b0.conv_stem and all(m.backbone.blocks[i] is b0.blocks[i] for i in range(5))
        assert m.backbone.blocks[5] is not b0.blocks[5] and m.backbone.conv_head is not b0.conv_head
    assert ens.ensemble.shared_prefix[0]["members"] == ["fold0", "fold1", "fold2"]
    # frozen BatchNorm stays frozen: every fold's list of eval-mode layers names the modules it runs
    for m in members:
        held = {id(x) for x in m.backbone.modules()}
        assert m._eval_modules and all(id(x) in held for x in m._eval_modules)
    calls = []
    b0.blocks[4].register_forward_hook(lambda *a: calls.append(4))
    for m in members:
        m.backbone.blocks[5].register_forward_hook(lambda *a: calls.append(5))
    got = ens.predict_images(pil_images())
    assert calls == [4, 5, 5, 5]
    apart = [Predictor.from_run(last2_run, engine="torch", fold=k).predict_images(pil_images()) for k in range(3)]
    np.testing.assert_allclose(got, np.mean(apart, axis=0), atol=1e-5)
    assert not np.allclose(apart[0], apart[1], atol=1e-4)  # the folds' tails really differ


def test_a_fold_file_holding_another_frozen_prefix_is_not_merged(last2_copy):
    from oncotransfer.infer.predict import Predictor
    from oncotransfer.io import atomic_save_tensors
    from oncotransfer.rundir import file_digest, read_checkpoint_meta, write_checkpoint_meta
    from safetensors.torch import load_file
    ckpt = last2_copy / "checkpoint"
    path = ckpt / "folds" / "fold2.safetensors"
    tensors = load_file(str(path))
    base = load_file(str(ckpt / "model.safetensors"))
    key = "backbone.blocks.2.0.conv_pw.weight"
    assert key not in tensors  # a frozen tensor is fold 0's: not stored again
    tensors[key] = base[key] * 1.01
    atomic_save_tensors(tensors, path, {"format": "oncotransfer-fold/1", "base": "model.safetensors", "fold": "2"})
    meta = read_checkpoint_meta(ckpt).content()
    meta["folds"] = [{**e, **file_digest(ckpt / e["file"])} if e["fold"] == 2 else e for e in meta["folds"]]
    write_checkpoint_meta(ckpt, meta)
    ens = Predictor.from_run(last2_copy, engine="torch")
    members = ens.ensemble.members
    assert members[2].backbone.blocks[2] is not members[0].backbone.blocks[2]
    assert torch.equal(members[2].backbone.blocks[2][0].conv_pw.weight, tensors[key])
    assert members[2].backbone.blocks[1] is members[0].backbone.blocks[1]  # equal stages before it: one copy
    assert [g.members for g in ens.ensemble.groups] == [[0, 1], [2]]
    assert "fold2: its own backbone" in ens.ensemble.sharing_line()
    apart = [Predictor.from_run(last2_copy, engine="torch", fold=k).predict_images(pil_images()) for k in range(3)]
    np.testing.assert_allclose(ens.predict_images(pil_images()), np.mean(apart, axis=0), atol=1e-5)


def test_onnx_export_holds_one_prefix_and_a_tail_per_fold(last2_copy):
    import onnx
    from oncotransfer.infer.export import export_run
    from oncotransfer.infer.predict import Predictor
    from oncotransfer.models.tail import Chain
    lines = []
    path = export_run(last2_copy, "onnx", log=lines.append)
    torch_pred = Predictor.from_run(last2_copy, "torch")
    group = torch_pred.ensemble.groups[0]
    convs = lambda module: sum(isinstance(m, torch.nn.Conv2d) for m in module.modules())  # noqa: E731
    prefix, tail = convs(group.prefix), convs(group.units[0][0])
    assert prefix and tail and isinstance(group.prefix, Chain)
    graph = onnx.load(str(path)).graph
    assert sum(n.op_type == "Conv" for n in graph.node) == prefix + 3 * tail  # not 3 * (prefix + tail)
    info = json.loads((last2_copy / "export" / "model.json").read_text())
    assert info["shared_prefix"][0]["prefix"][-1] == "blocks.4" and info["shared_prefix"][0]["tail"][0] == "blocks.5"
    assert any("one shared prefix (conv_stem .. blocks.4), 3 tails" in line for line in lines)
    assert info["parity"]["max_abs_diff"] <= 1e-4 and [m["fold"] for m in info["members"]] == [0, 1, 2]
    onnx_pred = Predictor.from_run(last2_copy)  # auto: the export holds the same members
    assert onnx_pred.engine == "onnx"
    np.testing.assert_allclose(onnx_pred.predict_images(pil_images()), torch_pred.predict_images(pil_images()),
                               atol=1e-4)
