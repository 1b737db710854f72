"""AdaBN: adapted copies carry the external images' BatchNorm statistics; the loaded models stay as they were."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from oncotransfer.errors import DataError
from oncotransfer.infer.adapt import adapt_batchnorm


class Member(nn.Module):
    """Backbone + head, as ``Classifier``: members built on one backbone object share it (frozen folds)."""

    def __init__(self, backbone: nn.Module, classes: int = 2):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(0.9), nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, classes))

    def forward(self, x):
        return self.head(self.backbone(x))


def backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.9),
                         nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def external(n: int = 37) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return 3.0 + 2.0 * torch.randn(n, 3, 12, 12, generator=g)  # another "scanner": shifted and wider


def batches(x: torch.Tensor, size: int = 8) -> list[torch.Tensor]:
    return [x[s:s + size] for s in range(0, len(x), size)]  # 8, 8, 8, 8, 5: unequal on purpose


def channel_stats(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = t.transpose(0, 1).reshape(t.shape[1], -1).double()
    return flat.mean(1), flat.var(1, unbiased=True)


def test_running_stats_become_the_external_data_statistics():
    model = nn.Sequential(backbone(), nn.Linear(4, 2)).eval()
    x = external()
    (adapted,) = adapt_batchnorm([model], batches(x))
    conv, bn = adapted[0][0], adapted[0][1]
    mean, var = channel_stats(conv(x).detach())  # the first BN's inputs over the whole set, not batch by batch
    assert torch.allclose(bn.running_mean.double(), mean, atol=1e-5)
    assert torch.allclose(bn.running_var.double(), var, rtol=1e-4)
    assert not adapted.training and not any(m.training for m in adapted.modules())
    # Deeper layers too: in eval mode the adapted model standardises the external images at every BN layer
    # (dropout stayed off during adaptation, or the second layer's statistics would be those of 90 % zeros).
    seen = {}
    for name, m in adapted.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(lambda mod, i, o, name=name: seen.__setitem__(name, o.detach()))
    with torch.no_grad():
        adapted(x)
    for name, out in seen.items():
        m, v = channel_stats(out)
        assert m.abs().max() < 0.05, name
        assert (v - 1).abs().max() < 0.1, name


def test_the_given_models_are_not_changed():
    model = nn.Sequential(backbone(), nn.Linear(4, 2)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = external()
    with torch.no_grad():
        reference = model(x)
    (adapted,) = adapt_batchnorm([model], batches(x))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training
    with torch.no_grad():
        assert torch.equal(model(x), reference)
        assert not torch.allclose(adapted(x), reference)
    learned = [k for k in before if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(before[k], adapted.state_dict()[k]) for k in learned)  # weights untouched


def test_a_shared_backbone_is_adapted_once_and_stays_shared():
    shared = backbone()
    calls = []
    shared.register_forward_hook(lambda *a: calls.append(1))  # deep-copied with the module: counts the copy's runs
    members = [Member(shared).eval(), Member(shared).eval(), Member(backbone()).eval()]
    x = external()
    adapted = adapt_batchnorm(members, batches(x))
    assert adapted[0].backbone is adapted[1].backbone
    assert adapted[0].backbone is not shared and adapted[2].backbone is not adapted[0].backbone
    assert len(calls) == len(batches(x))  # once per batch for the two members sharing it
    # each member's own head BatchNorm1d was adapted on the features of the adapted backbone
    for m in adapted:
        feats = m.head[1](m.backbone(x)).detach()
        mean, var = channel_stats(feats)
        assert torch.allclose(m.head[2].running_mean.double(), mean, atol=0.05)
    assert torch.equal(members[0].head[2].running_mean, torch.zeros(8))  # the originals were never trained


def test_a_one_image_batch_joins_the_next_and_empty_input_is_refused():
    model = nn.Sequential(backbone(), nn.Linear(4, 8), nn.BatchNorm1d(8)).eval()
    x = external(9)
    (a,) = adapt_batchnorm([model], [x[:1], x[1:2], x[2:]])
    (b,) = adapt_batchnorm([model], [x])
    assert torch.allclose(a[0][1].running_mean, b[0][1].running_mean, atol=1e-6)
    with pytest.raises(DataError, match="at least 2 external images"):
        adapt_batchnorm([model], [])
    with pytest.raises(DataError, match="at least one model"):
        adapt_batchnorm([], [x])
