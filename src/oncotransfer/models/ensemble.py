"""Ensembles of classifiers: the average of the members' (temperature-scaled, when fitted) probabilities.

Members that compute the same function up to a cut in their backbones (the folds of a ``last:N`` run share the
frozen stages; those of a frozen run the whole backbone) run that shared prefix once per batch, then each its
own tail and head: five ``last:2`` Lite0 folds cost one prefix (63% of a member's FLOPs) and five tails."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from oncotransfer.errors import ConfigError
from oncotransfer.models.tail import Chain, common_prefix, listed_stages, stage_chain


@dataclass
class PrefixGroup:
    """Members that read one ``prefix`` module's output: ``units`` are (tail or None, member indices), a tail
    run once for the members holding that very module; ``stages`` name the prefix's chain stages (empty when the
    prefix is a whole feature module the members hold as one object)."""
    prefix: nn.Module
    units: list[tuple[nn.Module | None, list[int]]]
    stages: list[str] = field(default_factory=list)
    tail_stages: list[str] = field(default_factory=list)

    @property
    def members(self) -> list[int]:
        return sorted(i for _, idx in self.units for i in idx)


def _feature_module(m: nn.Module) -> nn.Module:
    return m.feature_module() if hasattr(m, "feature_module") else m.backbone


def plan_groups(members: Sequence[nn.Module], equal_weights: bool = True) -> list[PrefixGroup]:
    """Group members by the prefix they share. Members holding one feature module object share it whole; among
    the others (a backbone per member), stages are shared up to the cut every group member computes the same
    way: the same module object, or (``equal_weights``) equal tensors. The cut is the deepest the first member
    shares with another, so a member whose prefix differs runs alone (or with those it matches) rather than
    cutting everyone's prefix short."""
    units: dict[tuple, list[int]] = {}
    for i, m in enumerate(members):
        units.setdefault((id(m.backbone), getattr(m, "pool_stages", 1)), []).append(i)
    whole = list(units.values())
    # unchecked listings to compare; a group is formed only once its members' chains pass stage_chain's check
    listed = {k: listed_stages(members[idx[0]].backbone) for k, idx in enumerate(whole)
              if len(whole) > 1 and getattr(members[idx[0]], "pool_stages", 1) == 1}
    groups: list[PrefixGroup] = []
    left = list(range(len(whole)))
    while left:
        ref, others = left[0], left[1:]
        shared = {o: _shared(listed.get(ref), listed.get(o), equal_weights) for o in others}
        best = max(shared.values(), default=0)  # the deepest cut: a unit matching less is not cut short there
        joined = [o for o in others if best and shared[o] >= best]
        chains = _checked([members[whole[u][0]].backbone for u in [ref, *joined]]) if joined else None
        if chains is None:
            groups.append(PrefixGroup(_feature_module(members[whole[ref][0]]), [(None, whole[ref])]))
            joined = []
        else:
            names = [n for n, _ in chains[0]]
            tails = [(Chain(c[best:]) if best < len(c) else None, whole[u]) for c, u in zip(chains, [ref, *joined])]
            groups.append(PrefixGroup(Chain(chains[0][:best]), tails, names[:best], names[best:]))
        left = [o for o in others if o not in joined]
    return groups


def _checked(backbones: list[nn.Module]) -> list[list[tuple[str, nn.Module]]] | None:
    try:
        return [stage_chain(b) for b in backbones]
    except ConfigError:  # not a plain chain of stages: each runs whole
        return None


def _shared(a, b, equal_weights: bool) -> int:
    if a is None or b is None:
        return 0
    if equal_weights:
        return common_prefix(a, b)
    n = 0
    while n < min(len(a), len(b)) and a[n][0] == b[n][0] and a[n][1] is b[n][1]:
        n += 1
    return n


class Ensemble(nn.Module):
    """``members`` (classifiers over the same classes and preprocessing) -> averaged (N, C) probabilities.

    Each member's logits are divided by its own temperature first, when it has one (``calibrated=True``).
    Members sharing a prefix (``plan_groups``, decided once here: members are not to be changed afterwards)
    run it once per batch and their own tails and heads on its output. One member is exactly that member's
    probabilities. ``equal_weights=False`` shares only modules that are one object (AdaBN must reach every
    member's own BatchNorm layers)."""

    def __init__(self, members: Sequence[nn.Module], temperatures: Sequence[float | None] | None = None,
                 names: Sequence[str] | None = None, equal_weights: bool = True):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.temperatures = list(temperatures) if temperatures is not None else [None] * len(members)
        self.names = list(names) if names is not None else [str(k) for k in range(len(members))]
        if len(self.temperatures) != len(members) or len(self.names) != len(members):
            raise ValueError("one temperature and one name per member")
        # a plain list: the plan's modules are the members' own, so the state dict keeps its keys
        self.groups: list[PrefixGroup] = plan_groups(list(members), equal_weights)

    @property
    def shares_backbone(self) -> bool:
        """True when every member uses one backbone module (frozen folds): it then runs once per batch."""
        return len({id(m.backbone) for m in self.members}) == 1

    @property
    def shared_prefix(self) -> list[dict]:
        """What runs once per batch for whom: ``[{"members", "prefix", "tail"}]`` (stage names), one entry per
        group of several members."""
        return [{"members": [self.names[i] for i in g.members],
                 "prefix": g.stages or ["the whole backbone"], "tail": g.tail_stages}
                for g in self.groups if len(g.members) > 1]

    def sharing_line(self) -> str:
        """One line: which members share which prefix, and which run alone."""
        parts = []
        for g in self.groups:
            who = ", ".join(self.names[i] for i in g.members)
            if len(g.members) == 1:
                parts.append(f"{who}: its own backbone")
            elif not g.stages:
                parts.append(f"{who}: one shared backbone, {len(g.members)} heads")
            else:
                parts.append(f"{who}: one shared prefix ({g.stages[0]} .. {g.stages[-1]}), "
                             f"{len(g.units)} tails ({g.tail_stages[0]} .. {g.tail_stages[-1]})"
                             if g.tail_stages else f"{who}: one shared backbone, {len(g.members)} heads")
        return "; ".join(parts)

    @property
    def calibrated(self) -> bool:
        return any(t is not None for t in self.temperatures)

    def member_outputs(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(each member's features, each member's logits); a shared prefix runs once."""
        feats: list[torch.Tensor | None] = [None] * len(self.members)
        for g in self.groups:
            a = g.prefix(x)
            for tail, idx in g.units:
                f = a if tail is None else tail(a)
                for i in idx:
                    feats[i] = f
        logits = [m.head(f) for m, f in zip(self.members, feats)]
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
