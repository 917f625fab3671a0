"""Delta-rule and test-time-training presets: DeltaNet, Gated DeltaNet, RWKV-7, TTT-Linear, Titans, Longhorn."""

from effarch.models.presets._sizes import SIZES, pure_config
from effarch.registry import register_preset


def _heads(s):
    return {"n_heads": max(1, s["d_model"] // s["head_dim"]), "head_dim": s["head_dim"]}


@register_preset("deltanet", family="linear/delta", paper="DeltaNet (arXiv 2406.06484)")
def deltanet(size: str = "small"):
    """DeltaNet in every layer: delta rule, short convs, L2-normalised q/k, RMSNorm output."""
    return pure_config("deltanet", "deltanet", size, options=_heads)


def gdn_heads(s) -> dict:
    """Gated DeltaNet's heads at a preset size: q / k half as wide as d_model, values twice that (expand_v 2), so
    its projections hold 4 d^2 weights per layer as GLA's do and the presets compare at one size (~341M at
    "large"). The paper's layer (q / k 3/4 of d_model, 6 d^2) is n_heads = 3 d_model / (4 head_dim)."""
    return {"n_heads": max(1, s["d_model"] // (2 * s["head_dim"])), "head_dim": s["head_dim"]}


@register_preset("gated-deltanet", family="linear/delta", paper="Gated Delta Networks (arXiv 2412.06464)")
def gated_deltanet(size: str = "small"):
    """Gated DeltaNet in every layer; q/k width half of d_model and values twice as wide (expand_v 2)."""
    return pure_config("gated-deltanet", "gated_deltanet", size, options=gdn_heads)


@register_preset("rwkv7", family="linear/delta", paper='RWKV-7 "Goose" (arXiv 2503.14456)')
def rwkv7(size: str = "small"):
    """RWKV-7 time mixing in every layer (SwiGLU FFN in place of RWKV's channel mixing)."""
    return pure_config("rwkv7", "rwkv7", size, options=lambda s: {"head_dim": s["head_dim"]})


@register_preset("ttt-linear", family="linear/ttt", paper="Learning to (Learn at Test Time) (arXiv 2407.04620)")
def ttt_linear(size: str = "small"):
    """TTT-Linear layers, mini-batch 16, with the output gate (the paper's Mamba-backbone variant)."""
    return pure_config("ttt-linear", "ttt_linear", size, options=_heads)


@register_preset("titans", family="linear/ttt", paper="Titans: Learning to Memorize at Test Time (arXiv 2501.00663)")
def titans(size: str = "small"):
    """Titans long-term-memory layers (linear memory, momentum, forgetting), mini-batch 16."""
    return pure_config("titans", "titans", size, options=_heads)


@register_preset("longhorn", family="linear/delta", paper="Longhorn (arXiv 2407.14207)")
def longhorn(size: str = "small"):
    """Longhorn blocks without FFNs, twice as many layers as a Transformer of the same size (Mamba's layout)."""
    s = SIZES[size]
    return pure_config("longhorn", "longhorn", size, ffn="none", layers=f"longhorn*{2 * s['n_layers']}")
