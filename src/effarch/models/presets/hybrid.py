"""Inter-layer hybrids: recurrent layers with a few attention layers, at the ratios of published models.

Qwen3-Next (Gated DeltaNet : attention = 3 : 1), Jamba (Mamba : attention = 7 : 1, "Jamba", arXiv
2403.19887), MiniMax-01 (lightning : softmax = 7 : 1, arXiv 2501.08313) and Samba (Mamba + sliding-window
attention 1 : 1, arXiv 2406.07522). Below 8 layers the ratio is kept as close as the depth allows.
"""

from __future__ import annotations

from effarch.models.presets._sizes import SIZES, pure_config
from effarch.models.presets.delta import gdn_heads
from effarch.registry import register_preset


def _attn(s, window: int | None = None, kv_ratio: int = 1):
    n = max(1, s["d_model"] // s["head_dim"])
    opts = {"type": "attn", "n_heads": n, "n_kv_heads": max(1, n // kv_ratio)}
    if window is not None:
        opts["window"] = window
    return opts


def _ratio_pattern(recurrent: str, other: str, every: int, n_layers: int) -> str:
    """`other` as the last layer of every group of `every` (groups shrink for shallow models)."""
    every = min(every, n_layers)
    groups, rest = divmod(n_layers, every)
    unit = " ".join([recurrent] * (every - 1) + [other])
    tail = " ".join([recurrent] * rest)
    return f"({unit})*{groups}" + (f" {tail}" if tail else "")


def _window(s) -> int:
    # 2048 at the large size (Samba, GDN-H); proportionally shorter for the small CPU sizes.
    return {"debug": 16, "small": 128, "medium": 512}.get(s.get("name", ""), 2048)


def _hybrid(name: str, size: str, layers: str, mixers: dict, **kw):
    return pure_config(name, "attn", size, layers=layers, mixers=mixers, **kw)


@register_preset("hybrid-gdn", family="hybrid/inter", paper="Gated Delta Networks (arXiv 2412.06464); Qwen3-Next")
def hybrid_gdn(size: str = "small"):
    """Gated DeltaNet with one grouped-query attention layer in every four (Qwen3-Next's 3 : 1)."""
    s = SIZES[size]
    gdn = {"type": "gated_deltanet", **gdn_heads(s)}
    return _hybrid(
        "hybrid-gdn", size, _ratio_pattern("gdn", "gqa", 4, s["n_layers"]), {"gdn": gdn, "gqa": _attn(s, kv_ratio=2)}
    )


@register_preset(
    "jamba", family="hybrid/inter", paper="Jamba: A Hybrid Transformer-Mamba Language Model (arXiv 2403.19887)"
)
def jamba(size: str = "small"):
    """Mamba-2 layers with one attention layer in every eight (Jamba's 1 : 7; Mamba-2 mixers here)."""
    s = SIZES[size]
    m2 = {"type": "mamba2", "head_dim": s["head_dim"], "d_state": 64}
    return _hybrid(
        "jamba", size, _ratio_pattern("m2", "gqa", 8, s["n_layers"]), {"m2": m2, "gqa": _attn(s, kv_ratio=2)}
    )


@register_preset(
    "minimax",
    family="hybrid/inter",
    paper="MiniMax-01: Scaling Foundation Models with Lightning Attention (arXiv 2501.08313)",
)
def minimax(size: str = "small"):
    """Lightning attention with one softmax attention layer after every seven."""
    s = SIZES[size]
    light = {"type": "lightning", "n_heads": max(1, s["d_model"] // s["head_dim"]), "n_layers": s["n_layers"]}
    return _hybrid(
        "minimax", size, _ratio_pattern("light", "attn", 8, s["n_layers"]), {"light": light, "attn": _attn(s)}
    )


@register_preset("samba", family="hybrid/inter", paper="Samba: Simple Hybrid State Space Models (arXiv 2406.07522)")
def samba(size: str = "small"):
    """Mamba and sliding-window attention alternating 1 : 1, no global attention."""
    s = {**SIZES[size], "name": size}
    return _hybrid(
        "samba",
        size,
        f"(mamba swa)*{max(1, s['n_layers'] // 2)}",
        {"mamba": {"type": "mamba"}, "swa": _attn(s, window=_window(s))},
    )


@register_preset(
    "transformer-swa", family="sparse/static", paper="Longformer (arXiv 2004.05150); Mistral 7B (arXiv 2310.06825)"
)
def transformer_swa(size: str = "small"):
    """Sliding-window attention in every layer: the cache stops growing at the window."""
    s = {**SIZES[size], "name": size}
    return pure_config(
        "transformer-swa", "swa", size, layers=f"swa*{s['n_layers']}", mixers={"swa": _attn(s, window=_window(s))}
    )
