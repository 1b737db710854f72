"""Device choice and the CPU fast path (channels_last + bf16 autocast)."""
from __future__ import annotations

import contextlib

import torch

from oncotransfer.errors import ConfigError


def pick_device(name: str = "auto") -> torch.device:
    """auto: CUDA, then MPS, then CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda was asked for but no CUDA GPU is visible; use auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise ConfigError("train.device: mps was asked for but this machine has no Apple GPU (MPS); use auto or cpu")
    return torch.device(name)


def cpu_bf16_native() -> bool:
    """True when the CPU computes in bf16 itself (AVX512-BF16 or AMX) and oneDNN uses it. Without those bf16
    autocast is emulated: 6-10x slower than fp32 on an AVX2-only CPU, and 4.4x per cached ``last:2`` step on
    an AVX512 Xeon without AVX512-BF16 (benchmarks/tail_step.py). oneDNN's own check is not enough: it
    answers True on any AVX512 CPU, where it emulates bf16."""
    try:
        isa = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return bool(isa and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def uses_bf16(device: torch.device, fast: bool) -> bool:
    return fast and (device.type == "cuda" or (device.type == "cpu" and cpu_bf16_native()))


def autocast(device: torch.device, fast: bool):
    """bf16 autocast on CUDA and on CPUs with native bf16, when ``fast``; otherwise fp32."""
    if not uses_bf16(device, fast):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def precision_label(device: torch.device, fast: bool) -> str:
    if not fast:
        return "fp32"
    if device.type == "cpu":
        return "bf16 autocast + channels_last" if uses_bf16(device, fast) else "fp32 + channels_last"
    return f"{device.type} bf16 autocast"


def prepare(model: torch.nn.Module, device: torch.device, fast: bool) -> torch.nn.Module:
    model = model.to(device)
    if fast and device.type in ("cpu", "cuda"):
        model = model.to(memory_format=torch.channels_last)
    return model
