"""Classification heads on pooled backbone features (the backbone already does global average pooling)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from oncotransfer.config import HeadConfig
from oncotransfer.errors import ConfigError


class Head(nn.Module):
    """An MLP on pooled features. ``sigmoid`` heads emit one logit for the positive (second) class."""

    def __init__(self, in_features: int, num_classes: int, hidden: list[int], dropout: float, sigmoid: bool):
        super().__init__()
        if sigmoid and num_classes != 2:
            raise ConfigError(f"model.head.sigmoid: a sigmoid head needs exactly 2 classes, the data has "
                              f"{num_classes}; set model.head.sigmoid: false")
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, 1 if sigmoid else num_classes))
        self.net = nn.Sequential(*layers)
        self.sigmoid = sigmoid
        self.num_classes = num_classes

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)

    def probabilities(self, logits: torch.Tensor, temperature: float | None = None) -> torch.Tensor:
        """Logits -> (N, num_classes) probabilities, also for the one-logit sigmoid head (see ``probabilities``)."""
        return probabilities(logits, self.sigmoid, temperature)

    def loss(self, class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0) -> Callable:
        """The training loss that matches this head's output (see ``loss_for``)."""
        return loss_for(self.sigmoid, class_weights, label_smoothing)


def probabilities(logits: torch.Tensor, sigmoid: bool, temperature: float | None = None) -> torch.Tensor:
    """Logits -> (N, C) probabilities: softmax, or for a one-logit head [1 - sigmoid, sigmoid]. A
    ``temperature`` (temperature scaling, fitted on validation data) divides the logits first; None leaves them."""
    logits = logits.float() if temperature is None else logits.float() / float(temperature)
    if sigmoid:
        p = torch.sigmoid(logits).reshape(-1, 1)
        return torch.cat([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


def loss_for(sigmoid: bool, class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0) -> Callable:
    """Softmax + cross-entropy, or (one-logit heads) sigmoid + binary cross-entropy.

    ``label_smoothing`` eps: softmax uses torch's ``CrossEntropyLoss(label_smoothing=eps)``; the one-logit head
    trains on the binary targets ``y (1 - eps) + eps / 2``, the same smoothing over its two classes."""
    eps = float(label_smoothing)
    if sigmoid:
        pos_weight = None if class_weights is None else class_weights[1:2] / class_weights[0]
        bce = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        if eps:
            return lambda logits, y: bce(logits.float().reshape(-1), y.float() * (1 - eps) + eps / 2)
        return lambda logits, y: bce(logits.float().reshape(-1), y.float())
    ce = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=eps)
    return lambda logits, y: ce(logits.float(), y)


HeadFactory = Callable[[HeadConfig, int, int], Head]
HEADS: dict[str, HeadFactory] = {}
"""model.head.kind -> factory(config, in_features, num_classes); a new head is one registered function (and
its name in ``config.HeadConfig.kind``)."""


def register_head(kind: str) -> Callable[[HeadFactory], HeadFactory]:
    def add(fn: HeadFactory) -> HeadFactory:
        HEADS[kind] = fn
        return fn
    return add


@register_head("paper_dense")
def _paper_dense(cfg: HeadConfig, in_features: int, num_classes: int) -> Head:
    """Dense(100, ReLU) -> softmax, the osteosarcoma study's head."""
    return Head(in_features, num_classes, list(cfg.hidden or [100]), cfg.dropout, cfg.sigmoid)


@register_head("linear")
def _linear(cfg: HeadConfig, in_features: int, num_classes: int) -> Head:
    return Head(in_features, num_classes, [], 0.0, cfg.sigmoid)


@register_head("mlp")
def _mlp(cfg: HeadConfig, in_features: int, num_classes: int) -> Head:
    """Configurable hidden layers and dropout (the multistage study's three dense layers)."""
    return Head(in_features, num_classes, list(cfg.hidden), cfg.dropout, cfg.sigmoid)


def head_factory(kind: str) -> HeadFactory:
    """The registered factory of ``model.head.kind``; an unknown name is a one-line error listing the valid ones."""
    if kind not in HEADS:
        raise ConfigError(f"model.head.kind: unknown head {kind!r}; expected one of {', '.join(HEADS)}")
    return HEADS[kind]


def create_head(cfg: HeadConfig, in_features: int, num_classes: int) -> Head:
    return head_factory(cfg.kind)(cfg, in_features, num_classes)
