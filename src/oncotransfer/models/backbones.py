"""Registry of backbones: our (the papers') names -> timm models, input size, normalisation, Grad-CAM layer."""
from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

import timm

from oncotransfer.errors import ConfigError


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    timm_name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    gradcam_layer: str
    paper: str = ""

    def preprocessing(self, image_size: int | None = None) -> dict:
        """What any runtime needs to feed this backbone: size, resize rule, mean and std."""
        return {"size": image_size or self.input_size, "resize": "squash-bilinear-antialias",
                "mean": list(self.mean), "std": list(self.std), "channels": "RGB", "scale": "0-1"}


def _spec(name: str, timm_name: str, gradcam_layer: str, paper: str = "") -> BackboneSpec:
    cfg = timm.models.get_pretrained_cfg(timm_name)
    return BackboneSpec(name, timm_name, int(cfg.input_size[-1]), tuple(cfg.mean), tuple(cfg.std),
                        gradcam_layer, paper)


BACKBONES: dict[str, BackboneSpec] = {
    s.name: s for s in [
        _spec("mobilenet_v2", "mobilenetv2_100", "bn2", "osteosarcoma"),
        _spec("resnet50_v2", "resnetv2_50", "norm", "osteosarcoma"),
        _spec("xception", "legacy_xception", "act4", "osteosarcoma"),
        _spec("inception_resnet_v2", "inception_resnet_v2", "conv2d_7b", "osteosarcoma"),
        _spec("resnet50", "resnet50", "layer4", "multistage"),
        _spec("efficientnet_lite0", "tf_efficientnet_lite0", "bn2", "offline ImageNet weights"),
        _spec("efficientnet_lite1", "tf_efficientnet_lite1", "bn2", "offline ImageNet weights (extra: lite)"),
        _spec("efficientnet_lite2", "tf_efficientnet_lite2", "bn2", "offline ImageNet weights (extra: lite)"),
    ]
}


def get_backbone(name: str) -> BackboneSpec:
    """Look up a backbone by our name, or any timm model as ``timm:<name>``."""
    if name in BACKBONES:
        return BACKBONES[name]
    if name.startswith("timm:"):
        timm_name = name[5:]
        if not timm.is_model(timm_name):
            close = difflib.get_close_matches(timm_name, timm.list_models(), n=3)
            raise ConfigError(f"model.backbone: timm has no model {timm_name!r}; close names: {close}")
        cfg = timm.models.get_pretrained_cfg(timm_name)
        size = int(cfg.input_size[-1]) if cfg else 224
        mean = tuple(cfg.mean) if cfg else (0.485, 0.456, 0.406)
        std = tuple(cfg.std) if cfg else (0.229, 0.224, 0.225)
        return BackboneSpec(name, timm_name, size, mean, std, gradcam_layer="")
    close = difflib.get_close_matches(name, BACKBONES, n=3)
    hint = f"did you mean {close}? " if close else ""
    raise ConfigError(f"model.backbone: unknown backbone {name!r}; {hint}valid: {sorted(BACKBONES)} "
                      "or timm:<model> (`oncotransfer models list` shows them)")


def with_normalisation(spec: BackboneSpec, mean: tuple, std: tuple) -> BackboneSpec:
    return replace(spec, mean=tuple(mean), std=tuple(std))
