"""A timm backbone as a chain of stages: cut it into a frozen prefix and a trainable tail, or pool several stages.

Tail fine-tuning on cached activations needs the backbone's forward pass to be ``prefix(x)`` then ``tail(a)``.
Most timm CNNs (EfficientNet/MobileNet, ResNet, ResNetV2, Xception, Inception-ResNet) run their top-level
children in registration order, with the block stages in one ``nn.Sequential``; ``stage_chain`` unrolls that
and checks on a real forward pass that the chain reproduces the backbone, so an unsupported model is an error
rather than silently wrong activations.
"""
from __future__ import annotations

import contextlib
import re
import weakref
from typing import Iterator

import torch
from torch import nn

from oncotransfer.errors import ConfigError

_STAGE_CONTAINERS = ("blocks", "stages", "layers")
_HEADS = ("classifier", "fc", "head_drop", "classif", "last_linear")


def stage_chain(backbone: nn.Module, check_size: int = 64) -> list[tuple[str, nn.Module]]:
    """(name, module) in forward order; block stages unrolled (``blocks.0`` ... ``blocks.6``), pooling last."""
    chain = listed_stages(backbone)
    # The check costs two forward passes; a frozen backbone shared by every fold (models.factory) needs it once.
    key = tuple(id(m) for _, m in chain)
    if _CHECKED.get(backbone) != key:
        _check_chain(backbone, chain, check_size)
        _CHECKED[backbone] = key
    return chain


def listed_stages(backbone: nn.Module) -> list[tuple[str, nn.Module]]:
    """What ``stage_chain`` returns, without checking that running it reproduces the backbone."""
    chain: list[tuple[str, nn.Module]] = []
    for name, child in backbone.named_children():
        if name in _HEADS:
            continue
        if name in _STAGE_CONTAINERS and isinstance(child, nn.Sequential):
            chain += [(f"{name}.{i}", stage) for i, stage in child.named_children()]
        else:
            chain.append((name, child))
    return chain


def same_stage(a: nn.Module, b: nn.Module) -> bool:
    """True when ``a`` and ``b`` compute the same function: one module, or the same class and configuration
    holding equal tensors (parameters and buffers) in the same train/eval modes."""
    if a is b:
        return True
    if type(a) is not type(b) or repr(a) != repr(b):
        return False
    if any(x.training != y.training for x, y in zip(a.modules(), b.modules())):
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape and sa[k].device == sb[k].device
        and torch.equal(sa[k], sb[k]) for k in sa)


def common_prefix(a: list[tuple[str, nn.Module]], b: list[tuple[str, nn.Module]]) -> int:
    """How many leading stages of two chains have the same name and compute the same function."""
    n = 0
    for (na, ma), (nb, mb) in zip(a, b):
        if na != nb or not same_stage(ma, mb):
            break
        n += 1
    return n


def adopt_stages(backbone: nn.Module, source: nn.Module, n: int) -> list[str]:
    """Make the first ``n`` stages of ``backbone``'s chain ``source``'s own modules, so that one copy of them
    is kept; the caller has checked (``common_prefix``) that they compute the same function. Returns their
    names. The swap keeps a chain the check accepted (the same stages, equal), so it is not checked again."""
    chain, theirs = stage_chain(backbone), dict(stage_chain(source))
    names = [name for name, _ in chain[:n]]
    for name in names:
        parent, _, leaf = name.rpartition(".")
        setattr(backbone.get_submodule(parent) if parent else backbone, leaf, theirs[name])
    _CHECKED[backbone] = tuple(id(m) for _, m in listed_stages(backbone))
    return names


_CHECKED: "weakref.WeakKeyDictionary[nn.Module, tuple[int, ...]]" = weakref.WeakKeyDictionary()
"""backbone -> the ids of the chain modules that ``_check_chain`` accepted for it."""


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for a probe pass, then every submodule's own mode back (frozen BatchNorm stays in eval)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, t in modes:
            m.training = t


def _check_chain(backbone: nn.Module, chain: list[tuple[str, nn.Module]], size: int) -> None:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with eval_mode(backbone):
        try:
            ref = backbone(x)
            out = x
            for _, m in chain:
                out = m(out)
            same = out.shape == ref.shape and torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
        except Exception:  # noqa: BLE001 - any failure means the chain is not this model's forward pass
            same = False
    if not same:
        raise ConfigError(f"{type(backbone).__name__}: its forward pass is not a plain chain of stages, so it "
                          "cannot be cut into a cached prefix and a tail (or pooled over stages); use "
                          "train.feature_cache: false, model.pool_stages: 1, or another backbone")


def cut_index(chain: list[tuple[str, nn.Module]]) -> int:
    """Position of the first chain element holding a trainable parameter (len(chain) when none does)."""
    for i, (_, m) in enumerate(chain):
        if any(p.requires_grad for p in m.parameters()):
            return i
    return len(chain)


def check_prefix_frozen(chain: list[tuple[str, nn.Module]], cut: int) -> None:
    """Caching the activations at ``cut`` is exact only if nothing before it trains."""
    for name, m in chain[:cut]:
        if any(p.requires_grad for p in m.parameters()):
            raise ConfigError(f"model.freeze: {name} trains but sits before the cut; the frozen part must be a "
                              "prefix of the backbone (use last:N or from:STAGE)")


class Chain(nn.Sequential):
    """Part of a backbone's chain, sharing (not copying) its modules."""

    def __init__(self, modules: list[tuple[str, nn.Module]]):
        super().__init__()
        for name, m in modules:
            self.add_module(name.replace(".", "_"), m)


class TailModel(nn.Module):
    """Cached prefix activations -> logits: the backbone's tail, then the head. Modules are the classifier's own,
    so training this trains the classifier. Frozen BatchNorm layers inside the tail stay in eval mode. The tail
    is called ``backbone`` so that ``train.backbone_lr_mult`` applies to it as to a whole backbone."""

    def __init__(self, tail: Chain, head: nn.Module, eval_modules: list[nn.Module]):
        super().__init__()
        self.backbone = tail
        self.head = head
        self._eval = eval_modules

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(a))

    def train(self, mode: bool = True) -> "TailModel":
        super().train(mode)
        for m in self._eval:
            m.eval()
        return self


def _is_stage(name: str) -> bool:
    """Block stages: ``blocks.N`` / ``stages.N`` / ``layers.N``, and ResNet's top-level ``layer1`` .. ``layer4``."""
    return name.split(".")[0] in _STAGE_CONTAINERS or re.fullmatch(r"layer\d+", name) is not None


class PooledStages(nn.Module):
    """Images -> the global-average-pooled outputs of the last ``k`` stages, concatenated (last stage first).

    The last stage is the backbone's own pooled feature vector (after its head convolution); earlier ones are
    the block stages before it, pooled the same way. Shares the backbone's modules."""

    def __init__(self, chain: list[tuple[str, nn.Module]], k: int):
        super().__init__()
        blocks = [i for i, (name, _) in enumerate(chain) if _is_stage(name)]
        if k - 1 > len(blocks):
            raise ConfigError(f"model.pool_stages: {k} asks for more stages than the backbone has "
                              f"({len(blocks) + 1} poolable: its block stages and its final features); "
                              f"use 1 .. {len(blocks) + 1}")
        self.chain = Chain(chain)
        self.taps = sorted(blocks[len(blocks) - (k - 1):]) if k > 1 else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = []
        for i, m in enumerate(self.chain):
            x = m(x)
            if i in self.taps:
                pooled.append(x.float().mean(dim=(2, 3)))
        return torch.cat([x.float().flatten(1)] + pooled[::-1], dim=1)


def pooled_width(chain: list[tuple[str, nn.Module]], k: int, size: int = 64) -> int:
    """Feature width of ``PooledStages(chain, k)``, measured on one small forward pass."""
    m = PooledStages(chain, k)
    with eval_mode(m):
        return int(m(torch.zeros(1, 3, size, size)).shape[1])
