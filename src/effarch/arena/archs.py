"""Which architectures the arena compares: `--arch` specs (presets or config files) or a default line-up.

The default takes one representative preset per survey family in the registry (a fixed preference list,
else the first preset of the family by name) plus every hybrid preset, so it grows with the registry.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from effarch import registry
from effarch.models.config import ModelConfig

# Representative presets, best first within each family; names not registered are passed over.
PREFERRED = (
    "transformer",
    "transformer-gqa",
    "mla",
    "retnet",
    "lightning",
    "gla",
    "hgrn2",
    "rwkv6",
    "mamba2",
    "mamba",
    "gated-deltanet",
    "gated_deltanet",
    "deltanet",
    "rwkv7",
    "ttt-linear",
    "ttt_linear",
    "titans",
    "swa",
    "nsa",
    "moba",
)


@dataclass(frozen=True)
class Arch:
    """One contestant. `label` is unique and names it in cells, tables and plots."""

    label: str
    spec: str  # as given: "name", "name:size" or a JSON path
    family: str  # the preset's survey family, or the families of a config file's mixers
    paper: str
    quality_config: ModelConfig  # for the quality tasks (vocab and length are set per task)
    speed_config: ModelConfig  # for the speed and memory cells


def _mixer_families(config: ModelConfig) -> str:
    fams = []
    for name in dict.fromkeys(config.layer_names):
        fam = registry.get("mixer", config.mixer_spec(name)[0]).family
        if fam not in fams:
            fams.append(fam)
    return "+".join(fams)


def _preset(name: str, size: str) -> ModelConfig:
    from effarch.models.presets import preset_config

    return preset_config(f"{name}:{size}")


def parse_arch(spec: str, quality_size: str, speed_size: str) -> Arch:
    """An `--arch` value: a preset `name` (sizes from the suite), `name:size`, or a config JSON file."""
    spec = spec.strip()
    if not spec:
        raise ValueError("--arch got an empty name; give a preset (name or name:size) or a config JSON file")
    path = Path(spec)
    if spec.endswith(".json") or path.is_file():
        if not path.is_file():
            raise ValueError(f"--arch config file {spec!r} does not exist")
        config = ModelConfig.from_json(path)
        if not config.causal:
            raise ValueError(f"--arch {spec!r} is a bidirectional model (causal=false); the arena needs causal LMs")
        return Arch(path.name, spec, _mixer_families(config), "", config, config)
    name, _, size = spec.partition(":")
    presets = registry.entries("preset")
    if name not in presets:
        raise ValueError(
            f"--arch {spec!r} is neither a registered preset nor a config JSON file; "
            f"registered presets are: {', '.join(presets)}"
        )
    entry = presets[name]
    quality = _preset(name, size or quality_size)
    speed = _preset(name, size or speed_size)
    if not quality.causal:
        raise ValueError(f"--arch {spec!r} is a bidirectional model (causal=false); the arena needs causal LMs")
    return Arch(spec, spec, entry.family, entry.paper, quality, speed)


def default_specs() -> list[str]:
    """One preset per survey family (diffusion excluded: not autoregressive) plus every hybrid preset."""
    by_family: dict[str, list[str]] = {}
    for name, entry in registry.entries("preset").items():
        by_family.setdefault(entry.family, []).append(name)
    order = list(registry.FAMILIES)
    chosen: list[str] = []
    for fam in sorted(by_family, key=lambda f: order.index(f) if f in order else len(order)):
        if fam.startswith("diffusion/"):
            continue
        names = sorted(by_family[fam])
        if fam.startswith("hybrid/"):
            chosen.extend(names)
            continue
        preferred = [n for n in PREFERRED if n in names]
        chosen.append(preferred[0] if preferred else names[0])
    # The dense Transformer is the baseline every table starts with.
    chosen.sort(key=lambda n: (n != "transformer",))
    return chosen


def resolve_archs(specs: list[str] | None, quality_size: str, speed_size: str) -> tuple[list[Arch], list[str]]:
    """(architectures, notes). Explicit specs must all resolve; a default preset that fails to build is
    left out with a note, so one broken preset does not stop the arena."""
    notes: list[str] = []
    if specs:
        items = [s for v in specs for s in v.split(",") if s.strip()]
        if not items:
            raise ValueError("--arch got no names; give presets (name or name:size) or config JSON files")
        archs = [parse_arch(s, quality_size, speed_size) for s in items]
    else:
        archs = []
        for name in default_specs():
            try:
                archs.append(parse_arch(name, quality_size, speed_size))
            except (ValueError, TypeError, KeyError) as e:
                notes.append(f"default preset {name!r} left out: {e}")
        if not archs:
            raise ValueError("no registered preset could be built for the arena; pass --arch")
    seen: dict[str, Arch] = {}
    for a in archs:
        if a.label in seen:
            continue
        seen[a.label] = a
    return list(seen.values()), notes


def task_config(config: ModelConfig, vocab_size: int, max_len: int) -> ModelConfig:
    """The architecture re-sized for a task's vocabulary and longest context."""
    return replace(config, vocab_size=vocab_size, max_seq_len=max(config.max_seq_len, max_len))
