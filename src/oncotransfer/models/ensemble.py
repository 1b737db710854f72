"""Ensembles of classifiers: the average of the members' (temperature-scaled, when fitted) probabilities."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Ensemble(nn.Module):
    """``members`` (classifiers over the same classes and preprocessing) -> averaged (N, C) probabilities.

    Each member's logits are divided by its own temperature first, when it has one (``calibrated=True``).
    Members holding the same backbone module object (the folds of a frozen run) run it once per batch and
    apply each head to the shared features. One member is exactly that member's probabilities."""

    def __init__(self, members: Sequence[nn.Module], temperatures: Sequence[float | None] | None = None,
                 names: Sequence[str] | None = None):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.temperatures = list(temperatures) if temperatures is not None else [None] * len(members)
        self.names = list(names) if names is not None else [str(k) for k in range(len(members))]
        if len(self.temperatures) != len(members) or len(self.names) != len(members):
            raise ValueError("one temperature and one name per member")

    @property
    def shares_backbone(self) -> bool:
        """True when every member uses one backbone module (frozen folds): it then runs once per batch."""
        return len({id(m.backbone) for m in self.members}) == 1

    @property
    def calibrated(self) -> bool:
        return any(t is not None for t in self.temperatures)

    def member_outputs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(each member's features, each member's logits); a backbone shared by members runs once."""
        features: dict[tuple, torch.Tensor] = {}
        feats, logits = [], []
        for m in self.members:
            # the features a head reads: the backbone's pooled output, or several stages pooled
            key = (id(m.backbone), getattr(m, "pool_stages", 1))
            if key not in features:
                features[key] = m.feature_module()(x) if hasattr(m, "feature_module") else m.backbone(x)
            feats.append(features[key])
            logits.append(m.head(features[key]))
        return feats, logits

    def member_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.member_outputs(x)[1]

    def average(self, logits: list[torch.Tensor], calibrated: bool = True) -> torch.Tensor:
        probs = [m.head.probabilities(z, t if calibrated else None)
                 for m, z, t in zip(self.members, logits, self.temperatures)]
        return probs[0] if len(probs) == 1 else torch.stack(probs).mean(0)

    def probabilities(self, x: torch.Tensor, calibrated: bool = True) -> torch.Tensor:
        return self.average(self.member_logits(x), calibrated)

    def both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(uncalibrated, calibrated) averages from one pass."""
        logits = self.member_logits(x)
        return self.average(logits, False), self.average(logits, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.probabilities(x)
