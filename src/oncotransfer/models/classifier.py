"""Backbone + head, freezing policies and the preprocessing that travels with the weights."""
from __future__ import annotations

import weakref

import torch
from timm.models import group_parameters
from torch import nn

from oncotransfer.errors import ConfigError
from oncotransfer.models.backbones import BackboneSpec
from oncotransfer.models.heads import Head
from oncotransfer.models.tail import (Chain, PooledStages, TailModel, check_prefix_frozen, cut_index, pooled_width,
                                      stage_chain)
from oncotransfer.models.weights import WeightsInfo


class Classifier(nn.Module):
    """``backbone`` maps images to pooled features; ``head`` maps features to logits."""

    def __init__(self, backbone: nn.Module, head: Head, spec: BackboneSpec, image_size: int,
                 weights: WeightsInfo | None = None, freeze: str = "finetune", pool_stages: int = 1):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.spec = spec
        self.image_size = image_size
        self.weights = weights
        self.freeze = freeze
        self.pool_stages = pool_stages
        self._eval_modules: list[nn.Module] = []
        # Not a registered submodule: it shares the backbone's modules, and the state dict keeps its keys.
        self._aux: dict[str, nn.Module] = {}
        if pool_stages > 1:
            self._aux["pooled"] = PooledStages(stage_chain(backbone), pool_stages)
        self._num_features = feature_width(backbone, pool_stages)  # a probe pass when stages are pooled: once
        apply_freeze(self, freeze)

    @property
    def num_features(self) -> int:
        return self._num_features

    def feature_module(self) -> nn.Module:
        """Images -> the features the head reads: the backbone's pooled output, or several stages pooled."""
        return self._aux.get("pooled", self.backbone)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feature_module()(x))

    def tail_split(self) -> tuple[Chain, TailModel, str]:
        """(frozen prefix, tail + head, name of the first tail stage) for training on cached prefix outputs."""
        if self.pool_stages > 1:
            raise ConfigError("model.pool_stages > 1 works with a frozen base only; set model.freeze: frozen "
                              "or model.pool_stages: 1")
        chain = stage_chain(self.backbone)
        cut = cut_index(chain)
        check_prefix_frozen(chain, cut)
        tail = Chain(chain[cut:])
        kept = {id(m) for m in tail.modules()}
        return Chain(chain[:cut]), TailModel(tail, self.head, [m for m in self._eval_modules if id(m) in kept]), \
            chain[cut][0] if cut < len(chain) else "head"

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.probabilities(self(x))

    def train(self, mode: bool = True) -> "Classifier":
        super().train(mode)
        # Frozen means eval mode too: BatchNorm in train mode would keep updating its running statistics.
        for m in self._eval_modules:
            m.eval()
        return self

    def preprocessing(self) -> dict:
        return self.spec.preprocessing(self.image_size)


def feature_width(backbone: nn.Module, pool_stages: int = 1) -> int:
    """Width of the features the head reads (a probe pass when stages are pooled, once per backbone and k)."""
    if pool_stages <= 1:
        return int(backbone.num_features)
    widths = _WIDTHS.setdefault(backbone, {})
    if pool_stages not in widths:
        widths[pool_stages] = pooled_width(stage_chain(backbone), pool_stages)
    return widths[pool_stages]


_WIDTHS: "weakref.WeakKeyDictionary[nn.Module, dict[int, int]]" = weakref.WeakKeyDictionary()


def _block_groups(backbone: nn.Module) -> list[list[str]]:
    groups = group_parameters(backbone, backbone.group_matcher(coarse=True))
    return [list(v) for v in groups.values()]


def _stage_label(param: str) -> str:
    """``blocks.6.0.conv_pw.weight`` -> ``blocks.6``; ``conv_head.weight`` -> ``conv_head``."""
    parts = param.split(".")
    return ".".join(parts[:2]) if parts[0] in ("blocks", "stages", "layers") else parts[0]


def _first_group(groups: list[list[str]], stage: str, model_name: str) -> int:
    """Index of the coarse group holding ``stage`` (e.g. ``blocks.6`` or ``conv_head``)."""
    for i, names in enumerate(groups):
        if any(n == stage or n.startswith(stage + ".") for n in names):
            return i
    labels = [_stage_label(g[0]) for g in groups]
    raise ConfigError(f"model.freeze: from:{stage}: {model_name} has no stage {stage!r}; give one of {labels}")


def apply_freeze(model: Classifier, policy: str) -> None:
    """frozen: no backbone gradients, backbone in eval mode; finetune: all; last:N: the last N coarse groups
    train; from:STAGE: the group holding STAGE (e.g. ``blocks.6``) and every later one train."""
    for p in model.parameters():
        p.requires_grad_(True)
    model._eval_modules = []
    if policy == "finetune":
        return
    if policy == "frozen":
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        model._eval_modules = [model.backbone]
    elif policy.startswith(("last:", "from:")):
        groups = _block_groups(model.backbone)
        if policy.startswith("last:"):
            n = int(policy[5:])
            if n > len(groups):
                raise ConfigError(f"model.freeze: last:{n} asks for more blocks than {model.spec.name} has "
                                  f"({len(groups)}); use last:1 .. last:{len(groups)} or finetune")
        else:
            n = len(groups) - _first_group(groups, policy[5:], model.spec.name)
        trainable = {name for g in groups[-n:] for name in g}
        for name, p in model.backbone.named_parameters():
            p.requires_grad_(name in trainable)
        model._eval_modules = [m for m in model.backbone.modules()
                               if isinstance(m, nn.modules.batchnorm._BatchNorm)
                               and not any(p.requires_grad for p in m.parameters(recurse=False))]
    else:
        raise ConfigError(f"model.freeze: unknown policy {policy!r}; expected frozen, finetune, last:N or from:STAGE")
    model.train(model.training)
