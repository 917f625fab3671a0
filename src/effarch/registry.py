"""The registry: every mixer, FFN and preset registers itself here with its name, survey family and paper.

The registry drives config parsing, `effarch list`, the arena and the parametrised tests, so adding an
architecture is one new file that calls a decorator below; no dispatch table is edited anywhere.
Built-in modules are discovered by walking the packages named in `_BUILTIN_PACKAGES`.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Survey families ("Speed Always Wins", arXiv 2508.09834), as `top/sub`.
FAMILIES = {
    "full/softmax": "Efficient full attention: softmax attention (MHA, IO-aware kernels)",
    "full/grouped": "Efficient full attention: grouped and multi-query attention (GQA/MQA)",
    "full/latent": "Efficient full attention: multi-head latent attention (MLA)",
    "full/mixture": "Efficient full attention: mixture of attention",
    "full/quantized": "Efficient full attention: quantized attention",
    "linear/attention": "Linear sequence models: linear attention",
    "linear/rnn": "Linear sequence models: linear RNNs",
    "linear/ssm": "Linear sequence models: state space models",
    "linear/delta": "Linear sequence models: delta-rule memories",
    "linear/ttt": "Linear sequence models: test-time-training memories",
    "sparse/static": "Sparse attention: static patterns",
    "sparse/dynamic": "Sparse attention: dynamic patterns",
    "sparse/training-free": "Sparse attention: training-free",
    "moe/routing": "Sparse mixture-of-experts: routing",
    "moe/experts": "Sparse mixture-of-experts: expert designs",
    "moe/conversion": "Sparse mixture-of-experts: dense-to-MoE conversion",
    "hybrid/inter": "Hybrid architectures: inter-layer",
    "hybrid/intra": "Hybrid architectures: intra-layer",
    "diffusion/masked": "Diffusion LLMs: masked diffusion",
    "diffusion/block": "Diffusion LLMs: block diffusion",
    "dense/ffn": "Dense feed-forward blocks",
    "dense/transformer": "Dense Transformer baseline",
}

_BUILTIN_PACKAGES = ("effarch.layers.mixers", "effarch.layers.ffns", "effarch.models.presets")


@dataclass(frozen=True)
class Entry:
    """One registered component."""

    kind: str  # "mixer", "ffn" or "preset"
    name: str
    family: str
    paper: str
    obj: Any
    debug: dict[str, Any] = field(default_factory=dict)  # tiny options for tests
    recurrent: bool = False  # state does not grow with context

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.obj) or ""
        return doc.splitlines()[0] if doc else ""


_ENTRIES: dict[str, dict[str, Entry]] = {"mixer": {}, "ffn": {}, "preset": {}}
_LOADED = False


def _register(kind: str, name: str, family: str, paper: str, debug: dict | None, recurrent: bool):
    if family not in FAMILIES:
        raise ValueError(f"family {family!r} of {kind} {name!r} is not one of {sorted(FAMILIES)}")

    def decorator(obj):
        existing = _ENTRIES[kind].get(name)
        if existing is not None and existing.obj is not obj:
            raise ValueError(f"{kind} name {name!r} is already registered by {existing.obj!r}")
        _ENTRIES[kind][name] = Entry(kind, name, family, paper, obj, dict(debug or {}), recurrent)
        return obj

    return decorator


def register_mixer(
    name: str, *, family: str, paper: str, debug: dict | None = None, recurrent: bool = False
) -> Callable:
    """Class decorator for a token mixer: `forward(x, state=None, *, cu_seqlens=None) -> (y, state)`.

    `debug` holds constructor options for a tiny instance used by the tests; `recurrent` says the
    decoding state has a fixed size whatever the context length.
    """
    return _register("mixer", name, family, paper, debug, recurrent)


def register_ffn(name: str, *, family: str, paper: str, debug: dict | None = None) -> Callable:
    """Class decorator for a channel mixer (MLP, MoE): `forward(x) -> y`, optional `.aux_loss`."""
    return _register("ffn", name, family, paper, debug, False)


def register_preset(name: str, *, family: str, paper: str) -> Callable:
    """Decorator for a function `(size: str = "small") -> ModelConfig` naming a ready-made model."""
    return _register("preset", name, family, paper, None, False)


def load_builtins() -> None:
    """Import every built-in module once, so their decorators run."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for pkg_name in _BUILTIN_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
            if not info.name.startswith("_"):
                importlib.import_module(f"{pkg_name}.{info.name}")


def entries(kind: str) -> dict[str, Entry]:
    load_builtins()
    return dict(sorted(_ENTRIES[kind].items()))


def get(kind: str, name: str) -> Entry:
    table = entries(kind)
    if name not in table:
        raise KeyError(f"unknown {kind} {name!r}; registered {kind}s are: {', '.join(table)}")
    return table[name]


def list_mixers() -> list[str]:
    """Names of all registered token mixers."""
    return list(entries("mixer"))


def list_ffns() -> list[str]:
    return list(entries("ffn"))


def list_presets() -> list[str]:
    """Names of all registered model presets."""
    return list(entries("preset"))


def constructor_options(obj: Any) -> dict[str, inspect.Parameter]:
    """Keyword options a component's constructor accepts (besides d_model, causal, layer_idx)."""
    sig = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj)
    skip = {"self", "d_model", "causal", "layer_idx"}
    return {
        n: p for n, p in sig.parameters.items() if n not in skip and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }
