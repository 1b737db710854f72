"""AdaBN (Li et al., 2016): re-estimate BatchNorm statistics on unlabelled images of the target domain.

A network trained on one scanner normalises every layer with that scanner's feature statistics; on another
scanner's images those statistics are off and the errors compound layer by layer. Replacing each BatchNorm
layer's running mean and variance by the ones the external images produce removes that first-order shift with
no labels and no training. The learned weights (BN's affine parameters included) stay as they are.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from oncotransfer.errors import DataError


def _batchnorms(modules: Iterable[nn.Module]) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer that keeps running statistics, once even when several members share it."""
    seen: dict[int, nn.modules.batchnorm._BatchNorm] = {}
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats \
                    and m.running_mean is not None:
                seen.setdefault(id(m), m)
    return list(seen.values())


class _Moments:
    """Per-channel sum and sum of squares of one BN layer's inputs over every batch, in float64.

    The pooled moments give the statistics of the whole external set: a cumulative average of per-batch
    statistics (``momentum=None``) weights a short last batch like a full one and misses the variance between
    batch means."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        self.bn = bn
        self.n = 0
        self.s = torch.zeros(bn.num_features, dtype=torch.float64)
        self.ss = torch.zeros(bn.num_features, dtype=torch.float64)

    def __call__(self, module: nn.Module, inputs: tuple) -> None:
        x = inputs[0].detach().to(torch.float64).transpose(0, 1).reshape(self.bn.num_features, -1)
        self.n += x.shape[1]
        self.s += x.sum(1).cpu()
        self.ss += (x * x).sum(1).cpu()

    def store(self) -> None:
        if self.n < 2:
            return
        mean = self.s / self.n
        var = (self.ss / self.n - mean * mean).clamp_min(0) * (self.n / (self.n - 1))  # unbiased, as BN keeps it
        self.bn.running_mean.copy_(mean.to(self.bn.running_mean))
        self.bn.running_var.copy_(var.to(self.bn.running_var))


def _runner(members: list[nn.Module]) -> Callable[[torch.Tensor], object]:
    """Runs every member on a batch, a module shared by several members (a frozen backbone, the frozen prefix of
    ``last:N`` folds) once, so its BatchNorm layers see each image once. Only one-object sharing: members whose
    prefixes are merely equal must each see the images, or their own layers would keep the old statistics."""
    from oncotransfer.models.ensemble import Ensemble
    if all(hasattr(m, "backbone") and hasattr(m, "head") for m in members):
        return Ensemble(members, equal_weights=False).member_outputs
    return lambda x: [m(x) for m in members]


def _at_least_two(batches: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The batches, a one-image batch joined to the next (train-mode BatchNorm1d refuses a batch of one)."""
    pending = None
    for b in batches:
        b = b if pending is None else torch.cat([pending, b])
        pending = b if len(b) < 2 else None
        if pending is None:
            yield b


def adapt_batchnorm(members: list[nn.Module], batches: Iterable[torch.Tensor]) -> list[nn.Module]:
    """Copies of ``members`` whose BatchNorm running statistics are those of ``batches`` (normalised float
    images of the external set, unlabelled), returned in eval mode; the given models are not changed.

    Only the BatchNorm layers run in train mode (dropout and the rest stay in eval), without gradients; each
    batch is normalised by its own statistics on the way, so deeper layers see adapted inputs. Members that
    share one backbone module (the folds of a frozen run) share one adapted copy of it. A BatchNorm layer the
    images never reach keeps its statistics; a model without BatchNorm comes back as an unchanged copy."""
    members = list(members)
    if not members:
        raise DataError("adapt_batchnorm needs at least one model")
    copies = copy.deepcopy(members)  # one deepcopy call: modules shared between members stay shared
    run = _runner(copies)  # before the hooks: planning may run probe passes
    bns = _batchnorms(copies)
    moments = [_Moments(bn) for bn in bns]
    momenta = [bn.momentum for bn in bns]
    hooks = [bn.register_forward_pre_hook(m) for bn, m in zip(bns, moments)]
    n = 0
    try:
        for c in copies:
            c.eval()
        for bn in bns:
            bn.momentum = 0.0  # the running buffers stay put during the pass; the pooled moments replace them
            bn.train()
        with torch.no_grad():
            for batch in _at_least_two(batches):
                run(batch)
                n += len(batch)
    finally:
        for h in hooks:
            h.remove()
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        for c in copies:
            c.eval()
    if bns and n < 2:
        raise DataError("adapting BatchNorm needs at least 2 external images")
    for m in moments:
        m.store()
    return copies
