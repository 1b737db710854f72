"""Backbone registry, weight sources, heads and the classifier that joins them.

The public API: ``create_classifier`` / ``classifier_for`` build one, ``load_classifier`` / ``load_members``
rebuild the one a run saved, ``read_checkpoint`` reads its files."""
from oncotransfer.models.backbones import BACKBONES, BackboneSpec, get_backbone
from oncotransfer.models.checkpoint import read_checkpoint
from oncotransfer.models.classifier import Classifier
from oncotransfer.models.factory import classifier_for, create_classifier, load_classifier, load_members

__all__ = ["BACKBONES", "BackboneSpec", "Classifier", "classifier_for", "create_classifier", "get_backbone",
           "load_classifier", "load_members", "read_checkpoint"]
