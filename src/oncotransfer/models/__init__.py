"""Backbone registry, weight sources, heads and the classifier that joins them."""
from oncotransfer.models.backbones import BACKBONES, BackboneSpec, get_backbone
from oncotransfer.models.classifier import Classifier, create_classifier

__all__ = ["BACKBONES", "BackboneSpec", "Classifier", "create_classifier", "get_backbone"]
