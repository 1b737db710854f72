"""A backbone as a chain of stages: cutting it into a frozen prefix and a trainable tail (freeze last:N and
from:STAGE), the tail's train/eval modes, and the pooled outputs of several stages (model.pool_stages)."""
from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from synthetic import randomise_bn
from oncotransfer.config import HeadConfig, validate
from oncotransfer.errors import ConfigError
from oncotransfer.models import create_classifier
from oncotransfer.models.tail import Chain, PooledStages, TailModel, cut_index, pooled_width, stage_chain

SIZE = 64

pytestmark = pytest.mark.usefixtures("one_thread")


def lite0(freeze: str = "frozen", pool_stages: int = 1, classes: int = 3):
    torch.manual_seed(0)
    return create_classifier("efficientnet_lite0", "none", HeadConfig(), classes, freeze, SIZE, pool_stages)


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def trainable(model) -> set[str]:
    return {n for n, p in model.backbone.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- stage_chain

@pytest.mark.parametrize("name, first, last_stage", [("tf_efficientnet_lite0", "conv_stem", "blocks.6"),
                                                      ("mobilenetv2_100", "conv_stem", "blocks.6"),
                                                      ("resnet50", "conv1", "layer4")])
def test_stage_chain_reproduces_the_backbone(name, first, last_stage):
    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False, num_classes=0)
    randomise_bn(net)
    chain = stage_chain(net)
    names = [n for n, _ in chain]
    assert names[0] == first and last_stage in names and names[-1] == "global_pool"
    assert not any(n in ("classifier", "fc") for n in names)
    net.eval()
    x = images(2, seed=3)
    with torch.no_grad():
        ref = net(x)
        out = Chain(chain)(x)
    assert out.shape == ref.shape == (2, net.num_features)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


class Residual(nn.Module):
    """Its forward adds a skip connection: running its children one after another is not its forward pass."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.global_pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.global_pool(x + self.conv(x)).flatten(1)


def test_a_module_that_is_not_a_chain_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as e:
        stage_chain(Residual())
    msg = str(e.value)
    assert "Residual" in msg and "chain" in msg and "\n" not in msg



def test_the_chain_check_runs_once_per_backbone_and_again_when_its_stages_change(monkeypatch):
    """Every fold of a frozen run shares one backbone (models.factory): its probe passes are paid once, not
    three times per fold; a backbone whose stages were swapped is checked again."""
    from oncotransfer.config import ModelConfig
    from oncotransfer.models import tail
    from oncotransfer.models import factory
    from oncotransfer.models.factory import classifier_for
    monkeypatch.setattr(factory, "_FROZEN", {})  # a private memo: the backbone altered below is not shared
    calls = []
    real = tail._check_chain
    monkeypatch.setattr(tail, "_check_chain", lambda *a: (calls.append(1), real(*a))[1])
    mc = ModelConfig(backbone="efficientnet_lite0", weights="none", freeze="frozen", pool_stages=4)
    torch.manual_seed(0)
    first = classifier_for(mc, 2, SIZE, 12345)
    torch.manual_seed(0)
    second = classifier_for(mc, 2, SIZE, 12345)
    assert second.backbone is first.backbone and len(calls) == 1
    assert second.num_features == first.num_features == 1904
    first.backbone.blocks[6] = Residual()  # a different module in the chain: checked again, and refused
    with pytest.raises(ConfigError, match="chain"):
        stage_chain(first.backbone)
    assert len(calls) == 2

# ---------------------------------------------------------------- freeze from:STAGE and the tail split

@pytest.mark.parametrize("explicit, counted", [("from:blocks.6", "last:1"), ("from:blocks.5", "last:2")])
def test_from_stage_trains_the_same_parameters_as_last_n(explicit, counted):
    a, b = trainable(lite0(explicit)), trainable(lite0(counted))
    assert a == b and a
    assert all(n.startswith(("blocks.", "conv_head", "bn2")) for n in a)
    assert any(n.startswith("blocks.6.") for n in a) and not any(n.startswith("blocks.4.") for n in a)
    assert any(n.startswith("blocks.5.") for n in a) == (explicit == "from:blocks.5")


def test_from_a_stage_inside_the_last_group_trains_that_whole_group():
    assert trainable(lite0("from:conv_head")) == trainable(lite0("last:1"))


def test_unknown_stage_is_a_config_error_listing_valid_names():
    with pytest.raises(ConfigError) as e:
        lite0("from:blocks.9")
    msg = str(e.value)
    assert "blocks.9" in msg and "model.freeze" in msg and "\n" not in msg
    for valid in ("conv_stem", "blocks.0", "blocks.5", "blocks.6"):
        assert repr(valid) in msg


def test_config_accepts_from_stage_and_rejects_an_empty_one():
    assert validate({"model": {"freeze": "from:blocks.6"}}).model.freeze == "from:blocks.6"
    with pytest.raises(ConfigError, match="model.freeze"):
        validate({"model": {"freeze": "from:"}})


@pytest.mark.parametrize("freeze, cut", [("last:1", "blocks.6"), ("from:blocks.5", "blocks.5")])
def test_tail_split_prefix_is_frozen_and_prefix_then_tail_is_the_classifier(freeze, cut):
    model = lite0(freeze)
    randomise_bn(model)
    prefix, tail, name = model.tail_split()
    assert name == cut
    prefix_params = list(prefix.parameters())
    assert prefix_params and not any(p.requires_grad for p in prefix_params)
    # the tail holds every trainable backbone parameter, and they are the classifier's own tensors
    tail_ids = {id(p) for p in tail.backbone.parameters() if p.requires_grad}
    assert tail_ids == {id(p) for p in model.backbone.parameters() if p.requires_grad}
    assert tail.head is model.head
    model.eval()
    tail.eval()
    x = images()
    with torch.no_grad():
        a = prefix(x)
        assert a.ndim == 4  # activations at the cut, not pooled features
        via_tail = model.head(tail.backbone(a))
        torch.testing.assert_close(tail(a), via_tail)
        torch.testing.assert_close(via_tail, model(x), atol=1e-5, rtol=1e-5)


def test_cut_index_is_the_first_trainable_element():
    chain = stage_chain(lite0("last:2").backbone)
    assert chain[cut_index(chain)][0] == "blocks.5"
    frozen = stage_chain(lite0("frozen").backbone)
    assert cut_index(frozen) == len(frozen)


def test_tail_split_refuses_pooled_stages():
    model = create_classifier("efficientnet_lite0", "none", HeadConfig(), 3, "last:1", SIZE, pool_stages=2)
    with pytest.raises(ConfigError, match="pool_stages"):
        model.tail_split()


# ---------------------------------------------------------------- train/eval modes

def test_tail_model_train_keeps_frozen_batchnorm_in_eval():
    frozen_bn, trained_bn = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
    for p in frozen_bn.parameters():
        p.requires_grad_(False)
    tail = Chain([("conv", nn.Conv2d(4, 4, 1)), ("bn_a", frozen_bn), ("bn_b", trained_bn),
                  ("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()))])
    model = TailModel(tail, nn.Linear(4, 2), [frozen_bn])
    model.eval()
    model.train()
    assert model.training and trained_bn.training and model.head.training
    assert not frozen_bn.training
    before = frozen_bn.running_mean.clone()
    model(torch.randn(8, 4, 3, 3) + 5)
    torch.testing.assert_close(frozen_bn.running_mean, before)  # frozen statistics do not move
    assert not torch.equal(trained_bn.running_mean, torch.zeros(4))
    model.eval()
    assert not trained_bn.training and not frozen_bn.training


def test_classifier_tail_trains_its_batchnorm_and_the_prefix_stays_in_eval():
    model = lite0("last:1")
    prefix, tail, _ = model.tail_split()
    tail.train()
    bns = lambda m: [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)]  # noqa: E731
    assert bns(prefix) and all(not b.training for b in bns(prefix))
    assert bns(tail.backbone) and all(b.training for b in bns(tail.backbone))
    model.train()  # the classifier's own train() keeps its frozen prefix in eval too
    assert all(not b.training for b in bns(prefix)) and all(b.training for b in bns(tail.backbone))


# ---------------------------------------------------------------- pooled stages

def test_one_pooled_stage_is_the_backbone_features():
    model = lite0()
    randomise_bn(model)
    model.eval()
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(PooledStages(stage_chain(model.backbone), 1)(x), model.backbone(x),
                                   atol=1e-5, rtol=1e-5)


def test_three_pooled_stages_of_lite0():
    model = lite0(pool_stages=3)
    randomise_bn(model)
    model.eval()
    assert model.num_features == 1280 + 320 + 192
    assert pooled_width(stage_chain(model.backbone), 3) == 1792
    assert model.head.net[0].in_features == 1792
    x = images()
    with torch.no_grad():
        feats = model.feature_module()(x)
        assert feats.shape == (len(x), 1792)
        torch.testing.assert_close(feats[:, :1280], model.backbone(x), atol=1e-5, rtol=1e-5)
        # the next columns are blocks.6 then blocks.5, average-pooled
        chain = stage_chain(model.backbone)
        a = x
        pooled = {}
        for name, m in chain:
            a = m(a)
            if name in ("blocks.5", "blocks.6"):
                pooled[name] = a.mean(dim=(2, 3))
        torch.testing.assert_close(feats[:, 1280:1600], pooled["blocks.6"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(feats[:, 1600:], pooled["blocks.5"], atol=1e-5, rtol=1e-5)
        assert model(x).shape == (len(x), 3)


def test_too_many_pooled_stages_is_a_config_error():
    chain = stage_chain(lite0().backbone)
    assert pooled_width(chain, 8) > 1792  # all seven block stages plus the head: still valid
    with pytest.raises(ConfigError) as e:
        PooledStages(chain, 9)
    assert "model.pool_stages" in str(e.value) and "\n" not in str(e.value)


def test_pooled_stages_keep_the_checkpoint_keys():
    one, three = lite0(pool_stages=1).state_dict(), lite0(pool_stages=3).state_dict()
    assert list(one) == list(three)
    assert one["head.net.0.weight"].shape[1] == 1280 and three["head.net.0.weight"].shape[1] == 1792


def test_pool_stages_above_one_needs_a_frozen_base():
    with pytest.raises(ConfigError) as e:
        validate({"model": {"freeze": "last:1", "pool_stages": 2}})
    assert "pool_stages" in str(e.value) and "\n" not in str(e.value)
    assert validate({"model": {"freeze": "frozen", "pool_stages": 2}}).model.pool_stages == 2


def test_pooled_stages_on_resnet_uses_its_top_level_layers():
    import timm

    from oncotransfer.models.tail import PooledStages, pooled_width, stage_chain
    net = timm.create_model("resnet50", pretrained=False, num_classes=0).eval()
    chain = stage_chain(net)
    assert pooled_width(chain, 3) == 2048 + 2048 + 1024  # final features, layer4, layer3
    with torch.no_grad():
        out = PooledStages(chain, 2).eval()(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 4096)
