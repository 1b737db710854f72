"""Backbone + head, freezing policies and the preprocessing that travels with the weights."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models import group_parameters
from torch import nn

from oncotransfer.config import HeadConfig
from oncotransfer.errors import ConfigError
from oncotransfer.models.backbones import BackboneSpec, get_backbone, with_normalisation
from oncotransfer.models.heads import Head, create_head
from oncotransfer.models.weights import WeightsInfo, build_backbone


class Classifier(nn.Module):
    """``backbone`` maps images to pooled features; ``head`` maps features to logits."""

    def __init__(self, backbone: nn.Module, head: Head, spec: BackboneSpec, image_size: int,
                 weights: WeightsInfo | None = None, freeze: str = "finetune"):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.spec = spec
        self.image_size = image_size
        self.weights = weights
        self.freeze = freeze
        self._eval_modules: list[nn.Module] = []
        apply_freeze(self, freeze)

    @property
    def num_features(self) -> int:
        return int(self.backbone.num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

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


def _block_groups(backbone: nn.Module) -> list[list[str]]:
    groups = group_parameters(backbone, backbone.group_matcher(coarse=True))
    return [list(v) for v in groups.values()]


def apply_freeze(model: Classifier, policy: str) -> None:
    """frozen: no backbone gradients, backbone in eval mode; finetune: all; last:N: the last N blocks train."""
    for p in model.parameters():
        p.requires_grad_(True)
    model._eval_modules = []
    if policy == "finetune":
        return
    if policy == "frozen":
        for p in model.backbone.parameters():
            p.requires_grad_(False)
        model._eval_modules = [model.backbone]
    elif policy.startswith("last:"):
        n = int(policy[5:])
        groups = _block_groups(model.backbone)
        if n > len(groups):
            raise ConfigError(f"model.freeze: last:{n} asks for more blocks than {model.spec.name} has "
                              f"({len(groups)}); use last:1 .. last:{len(groups)} or finetune")
        trainable = {name for g in groups[-n:] for name in g}
        for name, p in model.backbone.named_parameters():
            p.requires_grad_(name in trainable)
        model._eval_modules = [m for m in model.backbone.modules()
                               if isinstance(m, nn.modules.batchnorm._BatchNorm)
                               and not any(p.requires_grad for p in m.parameters(recurse=False))]
    else:
        raise ConfigError(f"model.freeze: unknown policy {policy!r}; expected frozen, finetune or last:N")
    model.train(model.training)


@dataclass
class ClassifierSpec:
    backbone: str
    weights: str
    head: HeadConfig
    num_classes: int
    freeze: str = "frozen"
    image_size: int | None = None


def create_classifier(backbone: str, weights: str, head: HeadConfig, num_classes: int,
                      freeze: str = "frozen", image_size: int | None = None) -> Classifier:
    """Build a classifier; the normalisation comes from the weights, not from a hard-coded ImageNet mean."""
    spec = get_backbone(backbone)
    net, info = build_backbone(spec, weights)
    spec = with_normalisation(spec, info.mean, info.std)
    head_module = create_head(head, int(net.num_features), num_classes)
    return Classifier(net, head_module, spec, image_size or spec.input_size, info, freeze)
