"""Classification heads on pooled backbone features (the backbone already does global average pooling)."""
from __future__ import annotations

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
        """Logits -> (N, num_classes) probabilities, also for the one-logit sigmoid head. A ``temperature``
        (temperature scaling, fitted on validation data) divides the logits first; None leaves them as they are."""
        if temperature is not None:
            logits = logits.float() / float(temperature)
        if self.sigmoid:
            p = torch.sigmoid(logits.float()).reshape(-1, 1)
            return torch.cat([1 - p, p], dim=1)
        return torch.softmax(logits.float(), dim=1)


def create_head(cfg: HeadConfig, in_features: int, num_classes: int) -> Head:
    """paper_dense: Dense(100, ReLU) -> softmax (osteosarcoma); linear; mlp: configurable (multistage)."""
    if cfg.kind == "paper_dense":
        return Head(in_features, num_classes, list(cfg.hidden or [100]), cfg.dropout, cfg.sigmoid)
    if cfg.kind == "linear":
        return Head(in_features, num_classes, [], 0.0, cfg.sigmoid)
    return Head(in_features, num_classes, list(cfg.hidden), cfg.dropout, cfg.sigmoid)
