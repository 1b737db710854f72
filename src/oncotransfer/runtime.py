"""Leaf module: usable cores, ONNX export and ONNX Runtime sessions on CPU (about 2x PyTorch eager here)."""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from oncotransfer.errors import MissingExtraError
from oncotransfer.io import atomic_write_bytes


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


BACKGROUND_NICE = 10
"""How far reader threads lower their priority: the engine's threads get about 90% of a core they compete for."""


def yield_to_engine() -> None:
    """Lower the calling thread's priority (Linux: each thread has its own nice value), for threads that
    decode the next batch while the engine scores this one on the same cores: an engine thread delayed at
    one of its barriers stalls the others, so decoding goes to the time the engine leaves. Elsewhere, nothing."""
    import threading
    try:
        tid = threading.get_native_id()
        # only ever lower it: a process already niced further stays where its user put it
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), BACKGROUND_NICE))
    except (AttributeError, OSError):  # not Linux, or not permitted: plain threads
        pass


def export_onnx(module: nn.Module, path: Path, size: int, opset: int = 17, dynamic_batch: bool = True,
                outputs: tuple[str, ...] = ("output",)) -> Path:
    """Export an eval-mode module that takes a normalised (N, 3, size, size) float batch; written atomically.
    ``outputs`` names the module's outputs (a tuple of tensors when several), each batch-first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = module.training
    module.eval()
    dummy = torch.zeros(2, 3, size, size)
    buf = io.BytesIO()  # exported in memory, then written by Python: a full disk is an OSError naming the file
    try:
        with warnings.catch_warnings(), static_same_padding(module, size):
            warnings.simplefilter("ignore")  # tracer warnings on timm's shape asserts are harmless here
            # The legacy TorchScript exporter: the dynamo one is slower to export and needs onnxscript.
            torch.onnx.export(module, (dummy,), buf, opset_version=opset, input_names=["input"],
                              output_names=list(outputs), dynamo=False,
                              dynamic_axes={n: {0: "batch"} for n in ("input", *outputs)} if dynamic_batch else None)
    finally:
        module.train(was_training)
    atomic_write_bytes(path, buf.getvalue())
    return path


class _PaddedConv(torch.autograd.Function):
    """A TF-"same" convolution whose padding is known: exported as one ONNX Conv with asymmetric ``pads``."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, pads, dilation, groups):  # noqa: ARG004 - autograd's signature
        return nn.functional.conv2d(nn.functional.pad(x, pads), weight, bias, stride, 0, dilation, groups)

    @staticmethod
    def symbolic(g, x, weight, bias, stride, pads, dilation, groups):
        left, right, top, bottom = pads
        inputs = (x, weight) if bias is None or bias.node().mustBeNone() else (x, weight, bias)
        return g.op("Conv", *inputs, strides_i=list(stride), pads_i=[top, left, bottom, right],
                    dilations_i=list(dilation), group_i=groups,
                    kernel_shape_i=list(weight.type().sizes()[2:]))


@contextlib.contextmanager
def static_same_padding(module: nn.Module, size: int) -> Iterator[None]:
    """While exporting at a fixed ``size``, timm's TF-"same" convolutions (``Conv2dSame``: EfficientNet-Lite and
    other ``tf_`` models) become single Convs with their padding as an attribute. Traced as they are, each pads
    its input with a ``Pad`` whose amounts are computed from the input's shape at run time; ONNX Runtime can
    neither fold it into the Conv nor keep its NCHWc layout across it, and the Pads with the layout reorders
    around them took 30% of Lite0's time. Results are bit-identical; other modules export as they are."""
    try:
        from timm.layers.conv2d_same import Conv2dSame
        from timm.layers.padding import pad_same_arg
    except ImportError:
        yield
        return
    convs = [m for m in module.modules() if isinstance(m, Conv2dSame) and "forward" not in vars(m)]
    if not convs:
        yield
        return
    seen: dict[nn.Module, tuple[int, int]] = {}
    def note(m: nn.Module, args: tuple) -> None:  # returns None: a pre-hook's return value replaces the input
        seen.setdefault(m, tuple(args[0].shape[-2:]))
    hooks = [m.register_forward_pre_hook(note) for m in convs]
    try:
        with torch.no_grad():  # one probe pass: the input size each convolution sees
            module(torch.zeros(1, 3, size, size))
    finally:
        for h in hooks:
            h.remove()
    for m, hw in seen.items():
        pads = tuple(pad_same_arg(list(hw), list(m.kernel_size), list(m.stride), list(m.dilation)))
        m.forward = (lambda m, pads: lambda x: _PaddedConv.apply(x, m.weight, m.bias, m.stride, pads, m.dilation,
                                                                  m.groups))(m, pads)
    try:
        yield
    finally:
        for m in seen:
            del m.forward


def ort_session(path: str | Path, threads: int | None = None, spin: bool = True):
    """A CPU ``onnxruntime.InferenceSession`` with all graph optimisations and one intra-op thread per core.
    ``spin=False``: idle intra-op threads sleep, leaving the cores to threads that decode the next batch."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingExtraError("onnxruntime is not installed; pip install onnxruntime, "
                                "or set train.feature_engine: torch") from None
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or usable_cores()
    opts.log_severity_level = 3
    if not spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_session_outputs(session, x: np.ndarray, batch_size: int = 32) -> list[np.ndarray]:
    """Run ``session`` over ``x`` (N, ...) float32 in batches; every output, stacked over the batches."""
    name = session.get_inputs()[0].name
    x = np.ascontiguousarray(x, dtype=np.float32)
    runs = [session.run(None, {name: x[s:s + batch_size]}) for s in range(0, len(x), batch_size)]
    if not runs:
        return [np.zeros((0,), np.float32) for _ in session.get_outputs()]
    return [np.concatenate([r[k] for r in runs]) for k in range(len(runs[0]))]


def run_session(session, x: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Run ``session`` over ``x`` (N, ...) float32 in batches; returns the stacked first output."""
    name = session.get_inputs()[0].name
    x = np.ascontiguousarray(x, dtype=np.float32)
    outs = [session.run(None, {name: x[s:s + batch_size]})[0] for s in range(0, len(x), batch_size)]
    if not outs:
        return np.zeros((0,), np.float32)
    return np.concatenate(outs)
