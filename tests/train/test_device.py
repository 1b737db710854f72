"""The CPU precision choice: bf16 autocast only where the CPU has bf16 arithmetic of its own."""
from __future__ import annotations

import pytest
import torch

from oncotransfer.train import device as D


@pytest.mark.parametrize("avx512_bf16, amx, onednn, native", [
    (False, False, True, False),  # plain AVX512: oneDNN says "supported" but emulates bf16
    (True, False, True, True), (False, True, True, True),
    (True, True, False, False),  # a oneDNN build without bf16 kernels
    (False, False, False, False)])
def test_bf16_autocast_needs_bf16_hardware_not_just_onednn(monkeypatch, avx512_bf16, amx, onednn, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    cpu = torch.device("cpu")
    assert D.cpu_bf16_native() is native
    assert D.uses_bf16(cpu, fast=True) is native
    assert isinstance(D.autocast(cpu, True), torch.autocast) is native
    assert D.precision_label(cpu, True) == ("bf16 autocast + channels_last" if native else "fp32 + channels_last")
    assert not D.uses_bf16(cpu, fast=False)


def test_a_torch_without_the_isa_queries_trains_in_fp32(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert D.cpu_bf16_native() is False
