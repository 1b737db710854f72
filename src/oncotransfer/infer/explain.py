"""Grad-CAM heatmaps (pytorch-grad-cam) on the backbone layer the registry names, and PNG overlays."""
from __future__ import annotations

import io
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch import nn

from oncotransfer.errors import ConfigError


class _TwoColumnLogits(nn.Module):
    """Classifier -> logits with one column per class; a one-logit sigmoid head z becomes [-z/2, z/2]
    (softmax of that equals the sigmoid), so class 0 gets a non-zero gradient too."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x)
        if getattr(self.model.head, "sigmoid", False):
            z = z.reshape(-1, 1)
            return torch.cat([-z / 2, z / 2], dim=1)
        return z


def target_layer(model: nn.Module) -> nn.Module:
    """The registry's Grad-CAM layer; for ``timm:<name>`` backbones the last feature module timm reports."""
    name = getattr(model.spec, "gradcam_layer", "") or ""
    backbone = model.backbone
    if not name:
        info = getattr(backbone, "feature_info", None)
        try:
            name = info[-1]["module"]
        except (TypeError, IndexError, KeyError):
            raise ConfigError(f"{model.spec.name}: no Grad-CAM layer known for this backbone") from None
    try:
        return backbone.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"{model.spec.name}: the backbone has no layer {name!r} for Grad-CAM") from None


@contextmanager
def gradients_enabled(model: nn.Module) -> Iterator[nn.Module]:
    """A frozen base has requires_grad False; Grad-CAM needs gradients through it, so enable them and restore."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(True)
        with torch.enable_grad():
            yield model
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        model.zero_grad(set_to_none=True)


def heatmaps(model: nn.Module, x: torch.Tensor, targets: list[int] | None = None) -> np.ndarray:
    """Normalised (N, 3, H, W) batch -> (N, H, W) Grad-CAM maps in [0, 1] for ``targets`` (default: predicted)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    if x.ndim == 3:
        x = x.unsqueeze(0)
    was_training = model.training
    model.eval()
    try:
        with gradients_enabled(model):
            wrapped = _TwoColumnLogits(model)
            with GradCAM(model=wrapped, target_layers=[target_layer(model)]) as cam:
                tg = None if targets is None else [ClassifierOutputTarget(int(t)) for t in targets]
                maps = cam(input_tensor=x.float(), targets=tg)
    finally:
        model.train(was_training)
    maps = np.nan_to_num(np.asarray(maps, dtype=np.float32), nan=0.0)
    return np.clip(maps, 0.0, 1.0)


def heatmap(model: nn.Module, x: torch.Tensor, target: int | None = None) -> np.ndarray:
    """One normalised image (3, H, W) or (1, 3, H, W) -> (H, W) Grad-CAM map in [0, 1]."""
    return heatmaps(model, x, None if target is None else [target])[0]


def _rgb_array(image: Image.Image | torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 3 and arr.shape[0] == 3 and arr.shape[-1] != 3:
        arr = arr.transpose(1, 2, 0)  # (3, H, W) tensor layout
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    return arr


def overlay_png(image: Image.Image | torch.Tensor | np.ndarray, heat: np.ndarray, max_side: int = 512) -> bytes:
    """PNG bytes of the image (shrunk to ``max_side``) with the heatmap as a jet overlay, resized to fit it."""
    from pytorch_grad_cam.utils.image import show_cam_on_image
    rgb = _rgb_array(image)
    h, w = rgb.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        rgb = np.asarray(Image.fromarray(rgb).resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                                     Image.BILINEAR))
    h, w = rgb.shape[:2]
    heat_img = Image.fromarray(np.asarray(heat, dtype=np.float32)).resize((w, h), Image.BILINEAR)
    mask = np.clip(np.asarray(heat_img, dtype=np.float32), 0.0, 1.0)
    out = show_cam_on_image(rgb.astype(np.float32) / 255.0, mask, use_rgb=True, image_weight=0.5)
    buf = io.BytesIO()
    Image.fromarray(out).save(buf, format="PNG")
    return buf.getvalue()
