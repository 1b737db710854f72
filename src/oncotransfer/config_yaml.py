"""The YAML side of a config, before the schema sees it: reading a file within the budgets, ``--set key=value``
overrides, and anchoring relative paths to the folder they were written in."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from oncotransfer.errors import ConfigError
from oncotransfer.weight_sources import anchored
from oncotransfer.yaml_io import load_text, read_text


def parse_value(text: str, key: str = "") -> Any:
    """Parse the right-hand side of ``--set key=value`` as YAML (numbers, booleans, lists); text that is not
    YAML stays text, but a value beyond the YAML budgets (``yaml_io``) is refused naming ``key``."""
    try:
        return load_text(text, f"--set {key}")
    except ConfigError as e:
        if "not valid YAML" in str(e):
            return text
        raise


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with each ``a.b.c=value`` applied."""
    out = _deep_copy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.lr=0.001")
        key, value = item.split("=", 1)
        node: Any = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if isinstance(node, list):  # stages.0.train.epochs
                if not part.isdigit() or int(part) >= len(node):
                    raise ConfigError(f"--set {key}: {part!r} is not an index of a list of {len(node)}")
                node = node[int(part)]
                continue
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, (dict, list)):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
            node = child
        if isinstance(node, list):
            raise ConfigError(f"--set {key}: give a key inside the list item, e.g. {key}.train.epochs=3")
        node[parts[-1]] = parse_value(value, key.strip())
    return out


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config or grid file as a mapping, read within the budgets of ``yaml_io`` (size, UTF-8, expansion)."""
    p = Path(path)
    raw = load_text(read_text(p), str(p)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping of config keys at the top level")
    return raw


# Keys holding a file-system path, in a config and in its stages; model.weights only as file:PATH or run:RUN_DIR.
_PATH_KEYS = ("data.path", "train.cache_dir", "output_dir", "model.weights", "init_from")


def anchor_path(key: str, value: Any, base: Path) -> Any:
    """``value`` of dotted ``key`` made absolute against ``base`` if it is a relative path (else unchanged)."""
    if key not in _PATH_KEYS or not isinstance(value, str) or not value or value.startswith("demo:"):
        return value
    if key == "model.weights":  # only file:PATH and run:RUN_DIR hold a path
        return anchored(value, base)
    rest = Path(value).expanduser()
    return str(rest if rest.is_absolute() else (base / rest).resolve())


def anchor_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """A copy of a raw config mapping whose relative paths (``_PATH_KEYS``, also inside ``stages``) are made
    absolute against ``base``; ``demo:NAME``, absolute paths and other keys are left as they are."""
    out = _deep_copy(raw)

    def fix(node: Any, keys: tuple[str, ...]) -> None:
        if not isinstance(node, dict):
            return
        for key in keys:
            section, _, leaf = key.rpartition(".")
            holder = node.get(section) if section else node
            if isinstance(holder, dict) and leaf in holder:
                holder[leaf] = anchor_path(key, holder[leaf], base)
    fix(out, ("data.path", "train.cache_dir", "output_dir", "model.weights"))
    stages = out.get("stages")
    for stage in stages if isinstance(stages, list) else []:
        fix(stage, ("data.path", "train.cache_dir", "init_from"))
    return out
