"""The ensemble of a search's top trials: how many to average, decided on the trials' inner-fold predictions.

Every completed trial keeps its held-out inner-fold probabilities (user attribute ``oof``, in inner-fold order).
The top K trials' mean (K = 1 .. ``search.ensemble``, best first) is scored on the same inner folds, and the
smallest K with the best score is kept. Each outer fold's search decides by this rule too, so the nested estimate
measures the rule, not the one ensemble it happened to pick. Members must read one input (image size and the
backbone's normalisation), so trials that differ from the best trial's input are not candidates."""
from __future__ import annotations

from typing import Any

import numpy as np

from oncotransfer.experiments.tune_cost import estimate_s, family, machine_factor
from oncotransfer.experiments.tune_space import defaults
from oncotransfer.experiments.tune_trial import OOF, Inner, score


def _input(inner: Inner, params: dict[str, Any]) -> tuple:
    from oncotransfer.models.backbones import get_backbone
    p = {**defaults(inner.base), **params}
    spec = get_backbone(p["backbone"])
    return int(p["image_size"]), tuple(spec.mean), tuple(spec.std)


def choose_members(study, inner: Inner, cap: int, optuna) -> tuple[list, list[dict[str, Any]]]:
    """(member trials, best first; one row per K tried: members, trials, inner score). The best trial alone when
    ``cap`` is 1 or no other completed trial kept its predictions (trials of an older version)."""
    best = study.best_trial
    if cap <= 1 or OOF not in best.user_attrs:
        return [best], []
    key = _input(inner, best.params)
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    others = sorted((t for t in done if t.number != best.number and OOF in t.user_attrs
                     and _input(inner, t.params) == key), key=lambda t: (-t.value, t.number))
    ranked = [best, *others][:cap]
    y = np.concatenate([inner.data_for(inner.base).manifest.labels[f.test] for f in inner.folds])
    classes = inner.data_for(inner.base).manifest.classes
    rows, probs = [], []
    for k, t in enumerate(ranked, start=1):
        probs.append(np.asarray(t.user_attrs[OOF], dtype=np.float64))
        rows.append({"members": k, "trials": [u.number for u in ranked[:k]],
                     "score": score(inner.search.metric, y, np.mean(probs, axis=0), classes)})
    chosen = max(rows, key=lambda r: (r["score"], -r["members"]))["members"]
    return ranked[:chosen], rows


def affordable(study, inner: Inner, cap: int, seconds_left: float | None, fits: list[tuple[float, int]],
               optuna) -> int:
    """How many of the final search's top trials the tune can still train in ``seconds_left``, at least 1 (the
    best trial's runs are what the budget's reserve is for). Each member costs its ``fits`` ((training images,
    fits): the final run with the config's split on all images, one refit per outer fold), estimated as
    ``tune_cost`` does and scaled by this study's finished trials; the members must fit 80% of the time left."""
    if seconds_left is None or cap <= 1:
        return cap
    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    spent, n = 0.0, 0
    for t in sorted(done, key=lambda t: (-t.value, t.number))[:cap]:
        p = {**defaults(inner.base), **t.params}
        spent += sum(estimate_s(p, int(rows), k) for rows, k in fits) * machine_factor(done, family(p))
        if n and spent > 0.8 * seconds_left:
            break
        n += 1
    return max(1, n)
