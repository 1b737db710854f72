"""One registry parses every weight source: the config, path anchoring, the loaders and stage chaining agree."""
from __future__ import annotations

from pathlib import Path

import pytest

from oncotransfer.config import anchor_path, validate
from oncotransfer.errors import ConfigError, WeightsError
from oncotransfer.models.backbones import get_backbone
from oncotransfer.models.weights import LOADERS, build_backbone
from oncotransfer.weight_sources import NAMED, PREFIXED, parse_weights, run_weights


def test_every_kind_has_a_loader():
    assert set(LOADERS) == set(NAMED) | set(PREFIXED)


@pytest.mark.parametrize("value, kind, argument", [
    ("imagenet", "imagenet", ""), ("none", "none", ""),
    ("efficientnet_lite1_packaged", "packaged", "efficientnet_lite1"),
    ("file:/w/x.pth", "file", "/w/x.pth"), ("run:runs/a", "run", "runs/a")])
def test_sources_parse_to_their_kind(value, kind, argument):
    src = parse_weights(value)
    assert (src.kind, src.argument) == (kind, argument)
    assert (src.path is not None) == (kind in ("file", "run"))


def test_run_weights_round_trips():
    src = parse_weights(run_weights("/r/x"))
    assert src.kind == "run" and src.stamp_file == Path("/r/x/checkpoint/model.safetensors")


@pytest.mark.parametrize("value, needle", [
    ("imagenet21k", "unknown weight source 'imagenet21k'; valid sources are imagenet, efficientnet_lite0_packaged"),
    ("efficientnet_lite9_packaged", "run:RUN_DIR, none"),
    ("file:", "'file:' names no path; give file:PATH")])
def test_a_bad_source_is_one_config_line_naming_the_key(value, needle):
    with pytest.raises(ConfigError) as e:
        validate({"model": {"weights": value}}, "c.yaml")
    msg = str(e.value)
    assert msg.startswith("c.yaml: bad value for 'model.weights'") and needle in msg and "\n" not in msg
    assert msg.count("model.weights") == 1


def test_the_loader_refuses_an_unvalidated_source_listing_the_valid_ones():
    with pytest.raises(WeightsError, match="model.weights: unknown weight source 'x'; valid sources are imagenet"):
        build_backbone(get_backbone("efficientnet_lite0"), "x")


def test_anchoring_reads_the_same_registry(tmp_path):
    assert anchor_path("model.weights", "file:w.pth", tmp_path) == f"file:{tmp_path / 'w.pth'}"
    assert anchor_path("model.weights", "run:/abs/r", tmp_path) == "run:/abs/r"
    for kept in ("imagenet", "none", "efficientnet_lite0_packaged", "not-a-source"):
        assert anchor_path("model.weights", kept, tmp_path) == kept
