"""Ensembles whose members compute the same function up to a cut (the folds of a last:N run) run that prefix
once per batch and each member's tail and head on its output, with the probabilities of running them apart."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from synthetic import randomise_bn
from oncotransfer.config import HeadConfig
from oncotransfer.models import create_classifier
from oncotransfer.models.ensemble import Ensemble

SIZE = 64

pytestmark = pytest.mark.usefixtures("one_thread")


def folds(freeze: str = "last:2", n: int = 3) -> list[nn.Module]:
    """``n`` separate copies of one Lite0 classifier, every trainable tensor perturbed per copy: what the folds
    of a ``freeze`` run look like (equal frozen stages, their own tails and heads)."""
    torch.manual_seed(0)
    base = create_classifier("efficientnet_lite0", "none", HeadConfig(), 3, freeze, SIZE)
    randomise_bn(base)
    out = []
    for k in range(n):
        m = copy.deepcopy(base)
        g = torch.Generator().manual_seed(10 + k)
        with torch.no_grad():
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        out.append(m.eval())
    return out


def images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))


def apart(members: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """The mean of the members' own probabilities, each running its whole backbone."""
    with torch.no_grad():
        return torch.stack([m.head.probabilities(m(x)) for m in members]).mean(0)


def count_calls(module: nn.Module, calls: list, tag=None) -> None:
    module.register_forward_hook(lambda *a: calls.append(tag))


@pytest.mark.parametrize("freeze, prefix_end, tail_start", [("last:2", "blocks.4", "blocks.5"),
                                                           ("last:1", "blocks.5", "blocks.6")])
def test_last_n_folds_run_the_frozen_prefix_once_with_the_same_probabilities(freeze, prefix_end, tail_start):
    members = folds(freeze)
    ens = Ensemble(members).eval()
    assert ens.shared_prefix == [{"members": ["0", "1", "2"], "prefix": ens.groups[0].stages,
                                  "tail": ens.groups[0].tail_stages}]
    assert ens.groups[0].stages[0] == "conv_stem" and ens.groups[0].stages[-1] == prefix_end
    assert ens.groups[0].tail_stages[0] == tail_start
    assert "one shared prefix (conv_stem .. " + prefix_end in ens.sharing_line()
    last_prefix, first_tail = (int(s.split(".")[1]) for s in (prefix_end, tail_start))
    prefix_calls, tail_calls = [], []
    for m in members:
        count_calls(m.backbone.blocks[last_prefix], prefix_calls)
        count_calls(m.backbone.blocks[first_tail], tail_calls)
    x = images()
    with torch.no_grad():
        got = ens(x)
    assert len(prefix_calls) == 1 and len(tail_calls) == 3  # one prefix, a tail per member
    torch.testing.assert_close(got, apart(members, x), atol=1e-5, rtol=0)
    assert not torch.allclose(got, apart(members[:1], x), atol=1e-3)  # the members really differ


def test_a_member_whose_frozen_prefix_differs_runs_alone():
    members = folds("last:2", 4)
    with torch.no_grad():
        members[2].backbone.blocks[2][0].conv_pw.weight.mul_(1.01)  # an early frozen stage no longer equal
    ens = Ensemble(members).eval()
    assert [g.members for g in ens.groups] == [[0, 1, 3], [2]]
    assert ens.groups[0].stages[-1] == "blocks.4"  # the others still share the whole frozen prefix
    assert "2: its own backbone" in ens.sharing_line()
    calls = []
    for k, m in enumerate(members):
        count_calls(m.backbone.blocks[4], calls, k)
    x = images()
    with torch.no_grad():
        got = ens(x)
    assert calls == [0, 2]  # the shared prefix once, then member 2's own
    torch.testing.assert_close(got, apart(members, x), atol=1e-5, rtol=0)


def test_frozen_copies_share_the_whole_backbone_and_one_object_sharing_needs_one_object():
    members = folds("frozen")
    ens = Ensemble(members).eval()
    assert len(ens.groups) == 1 and ens.groups[0].tail_stages == [] and not ens.shares_backbone
    assert "0, 1, 2: one shared backbone, 3 heads" == ens.sharing_line()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(ens(x), apart(members, x), atol=1e-5, rtol=0)
    # equal but separate modules are not merged when only module objects may be shared (AdaBN's passes)
    assert [g.members for g in Ensemble(members, equal_weights=False).groups] == [[0], [1], [2]]


def test_a_stage_in_another_mode_or_of_another_dtype_is_not_shared():
    members = folds("last:2")
    members[1].backbone.blocks[1].train()  # train-mode BatchNorm computes something else
    assert [g.members for g in Ensemble(members).groups] == [[0, 2], [1]]
    members = folds("last:2")
    members[2].backbone.conv_stem.double()
    assert [g.members for g in Ensemble(members).groups] == [[0, 1], [2]]
