"""Named presets: one file per architecture family registers `(size) -> ModelConfig` functions.

A preset is referred to as `name` or `name:size` (sizes in `SIZES`; default "small").
"""

from __future__ import annotations

from effarch import registry
from effarch.models.presets._sizes import SIZES, pure_config

DEFAULT_SIZE = "small"


def preset_config(spec: str):
    """ModelConfig of `name` or `name:size`."""
    name, _, size = spec.partition(":")
    size = size or DEFAULT_SIZE
    if size not in SIZES:
        raise ValueError(f"preset size {size!r} is not one of {', '.join(SIZES)}")
    entry = registry.get("preset", name)
    return entry.obj(size)


def resolve_config(spec: str):
    """A preset (`name` or `name:size`) or a JSON config file, as the command line accepts them."""
    from pathlib import Path

    from effarch.models.config import ModelConfig

    if spec.endswith(".json") or Path(spec).is_file():
        return ModelConfig.from_json(spec)
    try:
        return preset_config(spec)
    except KeyError as e:
        raise ValueError(f"{spec!r} is neither a config file nor a preset; {e.args[0].split('; ', 1)[-1]}") from None


__all__ = ["SIZES", "DEFAULT_SIZE", "preset_config", "pure_config", "resolve_config"]
