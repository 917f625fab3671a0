"""Linear-attention, linear-RNN and SSD presets: one pure model per additive linear-recurrence mixer.

Head counts follow the shared sizes (heads = d_model // head_dim); mixers whose papers drop the FFN
(Mamba-2, mLSTM) get twice the layers instead, as their papers compare at equal parameter counts.
"""

from effarch.models.presets._sizes import SIZES, pure_config
from effarch.registry import register_preset


def _heads(s):
    return {"n_heads": max(1, s["d_model"] // s["head_dim"])}


@register_preset("linear-attn", family="linear/attention", paper="Transformers are RNNs (arXiv 2006.16236)")
def linear_attn(size: str = "small"):
    """Linear attention with the elu + 1 feature map and the q . sum(k) normaliser."""
    return pure_config("linear-attn", "linear_attn", size, options=_heads)


@register_preset(
    "based",
    family="linear/attention",
    paper="Simple linear attention language models balance the recall-throughput tradeoff (arXiv 2402.18668)",
)
def based(size: str = "small"):
    """Based linear attention (Taylor feature map on 16-dim q/k, short conv) in every layer."""
    return pure_config("based", "based", size, options=_heads)


@register_preset("retnet", family="linear/attention", paper="Retentive Network (arXiv 2307.08621)")
def retnet(size: str = "small"):
    """Multi-scale retention (fixed per-head decays, rotary q/k, values twice as wide as keys)."""
    return pure_config("retnet", "retnet", size, options=_heads)


@register_preset(
    "lightning", family="linear/attention", paper="TransNormerLLM / Lightning Attention (arXiv 2307.14995)"
)
def lightning(size: str = "small"):
    """TransNormerLLM's Lightning Attention, decays depending on head and depth."""
    return pure_config("lightning", "lightning", size, options=lambda s: {**_heads(s), "n_layers": s["n_layers"]})


@register_preset("gla", family="linear/attention", paper="Gated Linear Attention (arXiv 2312.06635)")
def gla(size: str = "small"):
    """Gated linear attention (expand_k 0.5, expand_v 1), per-key data-dependent decay."""
    return pure_config("gla", "gla", size, options=lambda s: {"n_heads": max(1, s["d_model"] // (2 * s["head_dim"]))})


@register_preset("hgrn2", family="linear/rnn", paper="HGRN2 (arXiv 2404.07904)")
def hgrn2(size: str = "small"):
    """HGRN2 with state expansion head_dim and forget-gate lower bounds rising with depth."""
    return pure_config(
        "hgrn2", "hgrn2", size, options=lambda s: {"expand_ratio": s["head_dim"], "n_layers": s["n_layers"]}
    )


@register_preset("rwkv6", family="linear/rnn", paper="Eagle and Finch (arXiv 2404.05892)")
def rwkv6(size: str = "small"):
    """RWKV-6 time mixing in every layer (SwiGLU FFN in place of RWKV's channel mixing)."""
    return pure_config("rwkv6", "rwkv6", size, options=lambda s: {"head_dim": s["head_dim"], "n_layers": s["n_layers"]})


@register_preset("mamba2", family="linear/ssm", paper="Transformers are SSMs (arXiv 2405.21060)")
def mamba2(size: str = "small"):
    """Mamba-2 blocks without FFNs, twice as many layers as a Transformer of the same size."""
    s = SIZES[size]
    return pure_config(
        "mamba2",
        "mamba2",
        size,
        options=lambda s: {"head_dim": s["head_dim"], "d_state": min(128, 2 * s["head_dim"])},
        ffn="none",
        layers=f"mamba2*{2 * s['n_layers']}",
    )


@register_preset("mlstm", family="linear/rnn", paper="xLSTM (arXiv 2405.04517)")
def mlstm(size: str = "small"):
    """xLSTM[1:0]: mLSTM blocks only (4 heads; their up-projection replaces the FFN), twice the layers."""
    s = SIZES[size]
    return pure_config(
        "mlstm",
        "mlstm",
        size,
        options=lambda _: {"n_heads": 4},
        ffn="none",
        layers=f"mlstm*{2 * s['n_layers']}",
    )
