"""ONNX export of TF-"same" convolutions: one Conv each with its padding as an attribute, results unchanged."""
from __future__ import annotations

import contextlib

import numpy as np
import onnx
import pytest
import torch

from oncotransfer import runtime
from oncotransfer.config import HeadConfig
from oncotransfer.models.factory import create_classifier

pytest.importorskip("onnxruntime")


def test_same_padding_exports_without_pad_nodes_and_gives_bit_identical_outputs(tmp_path, monkeypatch):
    net = create_classifier("efficientnet_lite0", "none", HeadConfig(), 2, "frozen", 64).backbone.eval()
    same = [m for m in net.modules() if type(m).__name__ == "Conv2dSame"]
    assert len(same) == 5  # the stem and four stride-2 depthwise convolutions
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    new = runtime.export_onnx(net, tmp_path / "new.onnx", 64)
    assert all("forward" not in vars(m) for m in same)  # the export-time forward is gone again
    with monkeypatch.context() as mp:  # the export as traced before: a run-time Pad before each of them
        mp.setattr(runtime, "static_same_padding", lambda module, size: contextlib.nullcontext())
        old = runtime.export_onnx(net, tmp_path / "old.onnx", 64)

    ops = lambda p: [n.op_type for n in onnx.load(str(p)).graph.node]  # noqa: E731
    assert ops(old).count("Pad") == 5 and "Pad" not in ops(new)
    pads = [list(a.ints) for n in onnx.load(str(new)).graph.node if n.op_type == "Conv"
            for a in n.attribute if a.name == "pads"]
    assert [0, 0, 1, 1] in pads  # stride 2 on an even size: TF pads only bottom and right
    out = {p: runtime.ort_session(p, threads=1).run(None, {"input": x.numpy()})[0] for p in (old, new)}
    np.testing.assert_array_equal(out[new], out[old])
    with torch.no_grad():
        np.testing.assert_allclose(out[new], net(x).numpy(), atol=1e-4)
    net(x)  # PyTorch still runs the module's own forward
