"""LR schedules, discriminative lr groups, label smoothing, and the config checks that go with them."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from oncotransfer.config import HeadConfig, TrainConfig, validate
from oncotransfer.errors import CheckpointError, ConfigError
from oncotransfer.models.factory import create_classifier
from oncotransfer.models.heads import loss_for
from oncotransfer.train.loop import make_optimizer, train_one_epoch
from oncotransfer.train.schedule import lr_factor, make_schedule


def _opt(lr: float = 0.1, groups: int = 1) -> torch.optim.Optimizer:
    ps = [{"params": [nn.Parameter(torch.zeros(2))], "lr": lr * 0.5 ** g} for g in range(groups)]
    return torch.optim.SGD(ps, lr=lr)


def _run(cfg: TrainConfig, steps_per_epoch: int, val_losses=None, groups: int = 1) -> list[list[float]]:
    """The lr of every group at every batch of a fit, stepping the schedule as ``fit`` does."""
    opt = _opt(cfg.lr, groups)
    sched = make_schedule(opt, cfg, steps_per_epoch)
    seen = []
    for epoch in range(cfg.epochs):
        for _ in range(steps_per_epoch):
            seen.append([g["lr"] for g in opt.param_groups])
            opt.step()
            sched.step_batch()
        sched.step_epoch(val_losses[epoch] if val_losses else 1.0)
    return seen


def test_cosine_warmup_rises_linearly_then_reaches_the_floor_at_the_last_batch():
    cfg = TrainConfig(lr=0.1, epochs=5, schedule="cosine", warmup_epochs=1, min_lr_ratio=0.1)
    lrs = [g[0] for g in _run(cfg, steps_per_epoch=4)]
    assert len(lrs) == 20
    warm = lrs[:5]  # W = 4 steps: (t + 1) / 5 for t < 4, then 1 at t = 4
    assert warm == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1])
    assert max(lrs) == pytest.approx(0.1) and lrs.index(max(lrs)) == 4
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))          # monotone decay after warm-up
    assert lrs[-1] == pytest.approx(0.01)                          # min_lr_ratio × lr, exactly at the end
    mid = 4 + (19 - 4) / 2                                          # half way through the decay: the mean
    assert lr_factor("cosine", mid, 4, 20, 0.1) == pytest.approx(0.55)


def test_fractional_warmup_and_no_warmup():
    lrs = [g[0] for g in _run(TrainConfig(lr=1.0, epochs=3, schedule="cosine", warmup_epochs=0.5), 4)]
    assert lrs[:2] == pytest.approx([1 / 3, 2 / 3])                # W = 2 steps
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.0)
    lrs = [g[0] for g in _run(TrainConfig(lr=1.0, epochs=2, schedule="cosine"), 3)]
    assert lrs[0] == 1.0 and lrs[-1] == pytest.approx(0.0)


def test_onecycle_starts_at_a_25th_and_peaks_at_the_end_of_warmup():
    cfg = TrainConfig(lr=0.1, epochs=4, schedule="onecycle", warmup_epochs=1.5)
    lrs = [g[0] for g in _run(cfg, steps_per_epoch=4)]           # W = 6 steps
    assert lrs[0] == pytest.approx(0.1 / 25)
    steps = [b - a for a, b in zip(lrs[:6], lrs[1:7])]
    assert steps == pytest.approx([steps[0]] * 6)                  # linear rise ...
    assert lrs.index(max(lrs)) == 6 and max(lrs) == pytest.approx(0.1)   # ... to the peak at warm-up end
    assert lrs[-1] == pytest.approx(0.1 / 25 / 1e4)


def test_plateau_halves_once_patience_is_exceeded():
    cfg = TrainConfig(lr=0.1, epochs=8, schedule="plateau", plateau_patience=2, plateau_factor=0.5)
    losses = [1.0, 0.9, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95]       # best at epoch 2, then flat
    lrs = [g[0] for g in _run(cfg, steps_per_epoch=2, val_losses=losses)][::2]  # lr per epoch
    # epochs 3 and 4 are within patience; the 3rd bad epoch in a row (5) halves the lr from epoch 6 on
    assert lrs == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05])


def test_schedules_scale_every_group_alike():
    cfg = TrainConfig(lr=0.1, epochs=3, schedule="cosine", warmup_epochs=1)
    for a, b in _run(cfg, steps_per_epoch=3, groups=2):
        assert b == pytest.approx(a * 0.5)


def test_constant_schedule_leaves_the_optimizer_alone():
    opt = _opt(0.1)
    before = json.dumps(opt.state_dict()["param_groups"])
    sched = make_schedule(opt, TrainConfig(lr=0.1, epochs=3), 5)
    sched.step_batch()
    sched.step_epoch(1.0)
    assert json.dumps(opt.state_dict()["param_groups"]) == before   # no initial_lr, lr untouched


@pytest.mark.parametrize("over", [dict(schedule="cosine", warmup_epochs=1.5, min_lr_ratio=0.05),
                                  dict(schedule="onecycle", warmup_epochs=1),
                                  dict(schedule="plateau", plateau_patience=0)])
def test_state_round_trips_through_strict_json_and_continues_identically(over):
    cfg = TrainConfig(lr=0.1, epochs=4, **over)
    losses = [1.0, 2.0, 3.0, 4.0]
    opt = _opt(cfg.lr)
    sched = make_schedule(opt, cfg, 3)
    for _ in range(5):
        opt.step()
        sched.step_batch()
    sched.step_epoch(losses[0])
    saved = json.loads(json.dumps(sched.state_dict(), allow_nan=False))   # plain JSON, no Infinity
    groups = json.loads(json.dumps(opt.state_dict()["param_groups"]))
    opt2 = _opt(cfg.lr)
    sched2 = make_schedule(opt2, cfg, 3)
    opt2.load_state_dict({"state": {}, "param_groups": groups})
    sched2.load_state_dict(saved)
    for epoch in range(1, 3):
        for _ in range(3):
            opt.step(), opt2.step()
            sched.step_batch(), sched2.step_batch()
            assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        sched.step_epoch(losses[epoch]), sched2.step_epoch(losses[epoch])
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    with pytest.raises(CheckpointError, match="does not match"):
        make_schedule(_opt(cfg.lr), cfg, 4).load_state_dict(saved)


def test_discriminative_lr_groups():
    model = create_classifier("efficientnet_lite0", "none", HeadConfig(hidden=[8]), 2, "last:1", 32)
    opt = make_optimizer("adamw", model, 0.01, 0.0, backbone_lr_mult=0.1)
    head = {id(p) for p in model.head.parameters()}
    tail = {id(p) for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert [g["lr"] for g in opt.param_groups] == [0.01, pytest.approx(0.001)]
    assert {id(p) for p in opt.param_groups[0]["params"]} == head
    assert {id(p) for p in opt.param_groups[1]["params"]} == tail and tail
    # a multiplier of 1 keeps the one group of before, in the module's order
    single = make_optimizer("adam", model, 0.01)
    assert len(single.param_groups) == 1
    assert [id(p) for p in single.param_groups[0]["params"]] == [id(p) for p in model.parameters() if p.requires_grad]
    # a head on cached features has no backbone: one group at lr whatever the multiplier
    head_only = make_optimizer("adam", model.head, 0.01, backbone_lr_mult=0.1)
    assert [g["lr"] for g in head_only.param_groups] == [0.01]


def test_backbone_multiplier_changes_only_the_backbone_step():
    torch.manual_seed(0)
    model = create_classifier("efficientnet_lite0", "none", HeadConfig(kind="linear", hidden=[]), 2, "last:1", 32)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def moved(mult: float) -> dict[str, float]:
        model.load_state_dict(start)
        opt = make_optimizer("sgd", model, 0.1, backbone_lr_mult=mult)
        train_one_epoch(model, [(x, y)], opt, loss_for(False), torch.device("cpu"))
        return {n: float((p.detach() - start[n]).abs().sum()) for n, p in model.named_parameters() if p.requires_grad}
    full, tenth = moved(1.0), moved(0.1)
    assert any(n.startswith("backbone.") for n in full) and any(n.startswith("head.") for n in full)
    for name in full:   # SGD's first step is lr × grad: a tenth of the lr moves the backbone a tenth as far
        want = full[name] * (0.1 if name.startswith("backbone.") else 1.0)
        # (fp32 weights near 1 round a step of ~1e-3 to a few parts in 1e4)
        assert tenth[name] == pytest.approx(want, rel=1e-2, abs=1e-9), name


def test_unknown_optimizer_is_a_one_line_error():
    with pytest.raises(ConfigError) as e:
        make_optimizer("rmsprop", [nn.Parameter(torch.zeros(1))], 0.1)
    msg = str(e.value)
    assert "\n" not in msg and "train.optimizer" in msg and "'rmsprop'" in msg
    assert all(name in msg for name in ("adam", "adamw", "adagrad", "sgd"))


def test_label_smoothing_softmax_is_torchs_definition():
    torch.manual_seed(1)
    logits, y, eps = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2]), 0.2
    logp = torch.log_softmax(logits, 1)
    want = ((1 - eps) * -logp.gather(1, y[:, None]).squeeze(1) + eps * -logp.mean(1)).mean()
    got = loss_for(False, label_smoothing=eps)(logits, y)
    assert got == pytest.approx(float(want), rel=1e-6)
    assert float(loss_for(False)(logits, y)) == pytest.approx(float(nn.functional.cross_entropy(logits, y)))
    assert float(got) != pytest.approx(float(loss_for(False)(logits, y)))


def test_label_smoothing_sigmoid_smooths_the_binary_targets():
    torch.manual_seed(2)
    logits, y, eps = torch.randn(8, 1), torch.tensor([0, 1, 1, 0, 1, 0, 0, 1]), 0.1
    t = y.float() * (1 - eps) + eps / 2                               # 0 -> 0.05, 1 -> 0.95
    p = torch.sigmoid(logits.reshape(-1))
    want = -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()
    assert float(loss_for(True, label_smoothing=eps)(logits, y)) == pytest.approx(float(want), rel=1e-5)
    # the same smoothing as a two-class softmax with logits (0, z): the one-logit head is that softmax
    two = torch.cat([torch.zeros_like(logits), logits], 1)
    assert float(loss_for(True, label_smoothing=eps)(logits, y)) == pytest.approx(
        float(loss_for(False, label_smoothing=eps)(two, y)), rel=1e-5)


def _bad(train: dict, stages=None) -> str:
    raw = {"train": train, **({"stages": stages} if stages else {})}
    with pytest.raises(ConfigError) as e:
        validate(raw, "c.yaml")
    assert "\n" not in str(e.value)
    return str(e.value)


def test_bad_combinations_name_the_key():
    assert "train.warmup_epochs (5) must be less than train.epochs (5)" in _bad(
        {"schedule": "cosine", "warmup_epochs": 5, "epochs": 5})
    assert "train.warmup_epochs" in _bad({"warmup_epochs": 1})                       # constant lr: no warm-up
    assert "train.warmup_epochs must be > 0" in _bad({"schedule": "onecycle", "epochs": 10})
    assert "train.min_lr_ratio" in _bad({"schedule": "plateau", "min_lr_ratio": 0.1})
    assert "train.backbone_lr_mult" in _bad({"backbone_lr_mult": 2})
    assert "train.label_smoothing" in _bad({"label_smoothing": 1})
    assert "train.schedule" in _bad({"schedule": "step"})
    # a stage's keys lie over the top level's: its warm-up is checked against the top level's epochs
    msg = _bad({"epochs": 4, "schedule": "cosine"}, [{"name": "s1", "train": {"warmup_epochs": 4}}])
    assert "stage 's1'" in msg and "train.warmup_epochs (4)" in msg
    ok = validate({"train": {"epochs": 40}, "stages": [{"name": "s1", "train": {"schedule": "cosine",
                                                                                 "warmup_epochs": 35}}]})
    assert ok.stages[0].train.warmup_epochs == 35
    assert math.isclose(validate({"train": {"schedule": "onecycle", "warmup_epochs": 0.5, "epochs": 1}})
                        .train.warmup_epochs, 0.5)
