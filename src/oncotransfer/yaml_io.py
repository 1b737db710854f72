"""YAML for configs and grid files, read within budgets (``oncotransfer.limits``).

``yaml.safe_load`` expands aliases without bound (a "billion laughs" file of 30 lines is 10^9 nodes: it never
finishes, and whatever walks the result after it never does either), builds recursive structures from
``&a [*a]`` that make pydantic recurse until it crashes, reads ``!!binary`` as bytes that pass for strings, and
recurses once per nesting level. Here the document is composed first and its node graph walked, aliases
expanded, against ``MAX_YAML_NODES`` and ``MAX_YAML_DEPTH``; only then is it built into Python values.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

from oncotransfer.errors import CheckpointError, ConfigError
from oncotransfer.limits import MAX_CONFIG_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES


class _Loader(yaml.SafeLoader):
    """SafeLoader without the binary type: a config value is text, a number, a list or a mapping."""


def _refuse_binary(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    raise yaml.constructor.ConstructorError(None, None, "binary data (a !!binary tag) is not a config value",
                                            node.start_mark)


_Loader.add_constructor("tag:yaml.org,2002:binary", _refuse_binary)


def _check_graph(root: yaml.Node, source: str) -> None:
    """Walk the composed graph as construction would expand it: count nodes, find cycles and depth."""
    count = 0
    stack: list[tuple[yaml.Node, int, frozenset[int]]] = [(root, 1, frozenset())]
    while stack:
        node, depth, above = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            raise ConfigError(f"{source}: the YAML document expands to more than {MAX_YAML_NODES:,} values "
                              "(aliases of aliases: a 'billion laughs' document); write the values out instead")
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{source}: YAML nested more than {MAX_YAML_DEPTH} levels deep (at line "
                              f"{node.start_mark.line + 1}); a config is a few levels of mappings")
        if isinstance(node, yaml.ScalarNode):
            continue
        if id(node) in above:
            raise ConfigError(f"{source}: a recursive YAML alias at line {node.start_mark.line + 1} (an anchor "
                              "used inside itself, e.g. '&a [*a]'); a config value cannot contain itself")
        if isinstance(node, yaml.MappingNode):
            _no_repeated_keys(node, source)
        inner = above | {id(node)}
        children = node.value if isinstance(node, yaml.SequenceNode) else [x for kv in node.value for x in kv]
        stack.extend((c, depth + 1, inner) for c in children)


def _no_repeated_keys(node: yaml.MappingNode, source: str) -> None:
    """YAML keeps the last of two equal keys without a word: a config naming ``name`` twice is a mistake."""
    seen: dict[str, int] = {}
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
            line = key.start_mark.line + 1
            if key.value in seen:
                raise ConfigError(f"{source}: key {key.value!r} appears twice (lines {seen[key.value]} and {line}); "
                                  "keep one")
            seen[key.value] = line


def _yaml_error(e: yaml.YAMLError, source: str, text: str) -> ConfigError:
    if isinstance(e, yaml.reader.ReaderError):  # a control character: no mark, a position
        code = e.character if isinstance(e.character, int) else ord(e.character)
        return ConfigError(f"{source}: not valid YAML at line {text[:e.position].count(chr(10)) + 1}: character "
                           f"#x{code:04x} is not allowed (control characters and NUL bytes)")
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}" if mark else ""
    return ConfigError(f"{source}: not valid YAML{where}: {getattr(e, 'problem', None) or e}")


def load_text(text: str, source: str) -> Any:
    """One YAML document from ``text`` (None when empty); ``ConfigError`` naming ``source`` for bad YAML, a
    document beyond the budgets, recursive aliases or binary data."""
    loader = None
    try:
        loader = _Loader(text)  # refuses control characters at once
        node = loader.get_single_node()
        if node is None:
            return None
        _check_graph(node, source)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise _yaml_error(e, source, text) from None
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested too deeply to read; a config is a few levels of mappings") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_text(path: str | Path, what: str = "config file") -> str:
    """The text of a YAML file: a regular file of at most ``MAX_CONFIG_BYTES`` in UTF-8 (a BOM is allowed);
    ``ConfigError`` naming the file otherwise."""
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as e:
        if p.is_symlink():
            raise ConfigError(f"{what} {str(p)!r} is a broken symbolic link or symlink loop") from None
        raise ConfigError(f"{what} {str(p)!r} does not exist ({e.strerror}); pass the path of a YAML config "
                          "(see configs/ for examples)") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{what} {str(p)!r} is a folder; pass the path of a YAML config file")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{what} {str(p)!r} is not a regular file (a device, pipe or socket)")
    if st.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{what} {str(p)!r} is too large ({st.st_size:,} bytes, above the limit of "
                          f"{MAX_CONFIG_BYTES:,})")
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{what} {str(p)!r} cannot be read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); save the "
                          "config as UTF-8") from None


def read_run_yaml(path: str | Path) -> tuple[dict, str]:
    """(mapping, text) of a YAML file a run directory holds (its ``config.yaml``), under the same budgets as a
    user's config, since a copied or synced run is input too; ``({}, "")`` when the file is missing.
    ``CheckpointError`` naming the file when it is damaged or not a mapping."""
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        return {}, ""
    fix = "copy the whole run directory again, or retrain the run"
    try:
        text = read_text(p, "run file")
        data = load_text(text, str(p))
    except ConfigError as e:
        raise CheckpointError(f"{e}; the run directory is damaged: {fix}") from None
    if data is None:
        return {}, text
    if not isinstance(data, dict):
        raise CheckpointError(f"{p}: not a YAML mapping but {type(data).__name__}; the run directory is damaged: {fix}")
    return data, text
