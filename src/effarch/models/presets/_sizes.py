"""Shared preset sizes, so every architecture is compared at the same width and depth."""

from __future__ import annotations

from typing import Any

# d_model, layers, a head dimension for mixers with heads, and the FFN. "large" is the ~341M
# comparison model (d 1024, 24 layers, FFN 2816, vocab 32000).
SIZES: dict[str, dict[str, Any]] = {
    "debug": dict(d_model=64, n_layers=2, head_dim=16, vocab_size=260),
    "small": dict(d_model=128, n_layers=4, head_dim=32, vocab_size=260),
    "medium": dict(d_model=512, n_layers=8, head_dim=64, vocab_size=260),
    "large": dict(d_model=1024, n_layers=24, head_dim=128, vocab_size=32000, ffn_hidden=2816),
}


def pure_config(name: str, mixer: str, size: str, *, options=None, ffn: str = "swiglu", **overrides):
    """A model whose every layer is `mixer`; `options(size_dict) -> dict` gives its size-dependent options."""
    from effarch.models.config import ModelConfig

    s = SIZES[size]
    ffn_options = {"hidden": s["ffn_hidden"]} if "ffn_hidden" in s and ffn == "swiglu" else {}
    mixers = {mixer: options(s)} if options else {}
    kw = dict(
        name=f"{name}:{size}",
        vocab_size=s["vocab_size"],
        d_model=s["d_model"],
        layers=f"{mixer}*{s['n_layers']}",
        mixers=mixers,
        ffn=ffn,
        ffn_options=ffn_options,
    )
    kw.update(overrides)
    return ModelConfig(**kw)
