"""Config edge cases: YAML read within budgets, numbers finite and bounded, names a folder can have (issue 22)."""
from __future__ import annotations

import os

import pytest
from hypothesis import given, settings, strategies as st

from oncotransfer.config import apply_overrides, load_config, read_yaml, validate
from oncotransfer.errors import ConfigError
from oncotransfer.yaml_io import load_text


def laughs(levels: int, width: int = 9) -> str:
    lines = ["a0: &a0 [lol]"] + [f"a{k}: &a{k} [" + ", ".join([f"*a{k - 1}"] * width) + "]"
                                 for k in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, needle", [
    (laughs(12), "expands to more than"), ("a: &a [*a]\n", "recursive YAML alias"),
    ("a: &a {b: *a}\n", "recursive YAML alias"), ("name: !!binary aGVsbG8=\n", "!!binary"),
    ("x: " + "[" * 5000 + "]" * 5000 + "\n", "nested"), ("!!python/object/apply:os.system ['id']\n", "not valid YAML"),
    ("a: [1\n", "not valid YAML"), ("name: a\nname: b\n", "key 'name' appears twice"),
    ("a: {x: 1, x: 2}\n", "key 'x' appears twice"), ("a: 1\nb: \x00\n", "line 2")])
def test_hostile_yaml_is_one_config_error(text, needle):
    with pytest.raises(ConfigError, match=needle):
        load_text(text, "cfg.yaml")


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 8), st.integers(2, 12))
def test_alias_expansion_is_counted_not_built(levels, width):
    """A document is accepted exactly when its expansion fits the node budget."""
    from oncotransfer.limits import MAX_YAML_NODES
    size = 1 + sum(1 + sum(width ** j for j in range(1, k + 1)) + width ** k for k in range(levels))  # upper bound
    try:
        load_text(laughs(levels, width), "g.yaml")
    except ConfigError as e:
        assert "expands to more than" in str(e)
        assert size > MAX_YAML_NODES
    else:
        assert width ** (levels - 1) < MAX_YAML_NODES


@pytest.mark.parametrize("data, needle", [("caf\xe9: 1\n".encode("latin-1"), "not UTF-8"),
                                          ("x: 1\n".encode("utf-16"), "not UTF-8"), (b"x: 1\n", None),
                                          ("\ufeffx: 1\n".encode(), None)])
def test_config_files_must_be_utf8(tmp_path, data, needle):
    p = tmp_path / "c.yaml"
    p.write_bytes(data)
    if needle is None:
        assert read_yaml(p) == {"x": 1}
    else:
        with pytest.raises(ConfigError, match=needle):
            read_yaml(p)


def test_config_files_that_are_not_regular_files(tmp_path):
    os.mkfifo(tmp_path / "fifo.yaml")
    with pytest.raises(ConfigError, match="not a regular file"):
        read_yaml(tmp_path / "fifo.yaml")
    with pytest.raises(ConfigError, match="not a regular file"):
        read_yaml("/dev/zero")
    with open(tmp_path / "big.yaml", "wb") as f:
        f.truncate(2**40)
    with pytest.raises(ConfigError, match="too large"):
        read_yaml(tmp_path / "big.yaml")


@pytest.mark.parametrize("key", ["train.lr", "train.weight_decay", "train.warmup_epochs", "train.min_lr_ratio",
                                 "train.label_smoothing", "train.plateau_factor", "train.backbone_lr_mult",
                                 "model.head.dropout", "augment.rotation", "augment.zoom", "augment.shift",
                                 "augment.brightness", "split.test_size", "split.val_size",
                                 "evaluate.ood_pass_rate"])
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_no_float_key_takes_nan_or_infinity(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(apply_overrides({}, [f"{key}={value}"]))


@pytest.mark.parametrize("item, needle", [("train.weight_decay=1e308", "train.weight_decay"),
                                          ("model.head.hidden=[100000000]", "model.head.hidden"),
                                          ("model.head.hidden=[" + ",".join(["8"] * 100) + "]", "model.head.hidden"),
                                          ("name=" + "n" * 300, "'name'"), ('name="a\\nb"', "'name'"),
                                          ("name=a\x1b[2Jb", "'name'")])
def test_bounds_that_keep_a_run_possible(item, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(apply_overrides({}, [item]))


def test_two_stages_with_one_name_are_refused():
    with pytest.raises(ConfigError, match="stages: the name 's1' is given to 2 stages"):
        validate({"stages": [{"name": "s1"}, {"name": "s1"}]})
    validate({"stages": [{"name": "s1"}, {"name": "s2"}]})


@pytest.mark.parametrize("value", [laughs(9).replace("\n", ", ").join("{}"), "&a [*a]", "!!binary aGVsbG8="])
def test_set_values_are_read_within_the_budgets(value):
    with pytest.raises(ConfigError, match="train.lr"):
        validate(apply_overrides({}, [f"train.lr={value}"]))


def test_grid_of_a_million_runs_is_refused_before_expanding(tmp_path):
    from oncotransfer.experiments.grid import load_grid
    base = tmp_path / "base.yaml"
    base.write_text("name: b\n")
    g = tmp_path / "g.yaml"
    g.write_text(f"base_config: {base}\ngrid:\n  train.lr: [" + ", ".join(f"0.{k + 1:04d}" for k in range(1000))
                 + "]\n  train.seed: [" + ", ".join(str(k) for k in range(1000)) + "]\n")
    with pytest.raises(ConfigError, match="1,000,000 runs, above the limit"):
        load_grid(g)
    g.write_text(f"base_config: {base}\ntrials: 1000000000\n")
    with pytest.raises(ConfigError, match="above the limit"):
        load_grid(g)


def test_mps_on_a_machine_without_it():
    import torch
    from oncotransfer.train.device import pick_device
    if torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(ConfigError, match="train.device: mps"):
        pick_device("mps")


LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{k}: &{k} [{', '.join(['*' + p] * 10)}]\n" for p, k in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("content, needle", [(LAUGHS.encode(), "expands to more than"),
                                             (b"\xff\xfe garbage \x81", "not UTF-8"),
                                             (b"- just\n- a list\n", "not a YAML mapping"),
                                             (b"name: !!binary aGVsbG8=\n", "binary data")])
def test_a_run_directorys_yaml_is_read_within_the_budgets(tmp_path, content, needle):
    """A copied or synced run is input too: report, grid resume and tracking read its config.yaml like a config."""
    from oncotransfer.errors import CheckpointError
    from oncotransfer.yaml_io import read_run_yaml
    assert read_run_yaml(tmp_path / "config.yaml") == ({}, "")
    (tmp_path / "config.yaml").write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"config\.yaml.*{needle}.*run directory is damaged"):
        read_run_yaml(tmp_path / "config.yaml")


def test_evaluate_names_a_run_config_that_expands_exponentially(tiny_run, tmp_path):
    import shutil

    from oncotransfer.errors import CheckpointError
    from oncotransfer.evaluate.report import evaluate_run
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "config.yaml").write_text(LAUGHS)
    with pytest.raises(CheckpointError, match=r"config\.yaml: the YAML document expands"):
        evaluate_run(run)
