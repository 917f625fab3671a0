"""The Transformer baseline (LLaMA-style: RoPE, RMSNorm, SwiGLU) and its GQA / MQA variants."""

from effarch.models.presets._sizes import pure_config
from effarch.registry import register_preset


def _heads(s, kv_ratio: int | None = None):
    n = max(1, s["d_model"] // s["head_dim"])
    kv = n if kv_ratio is None else max(1, n // kv_ratio)
    return {"n_heads": n, "n_kv_heads": kv}


@register_preset("transformer", family="dense/transformer", paper="LLaMA (arXiv 2302.13971)")
def transformer(size: str = "small"):
    """Multi-head attention in every layer."""
    return pure_config("transformer", "attn", size, options=_heads)


@register_preset("transformer-gqa", family="full/grouped", paper="GQA (arXiv 2305.13245)")
def transformer_gqa(size: str = "small"):
    """Grouped-query attention: one KV head per 2 query heads (4 at large sizes)."""
    return pure_config("transformer-gqa", "attn", size, options=lambda s: _heads(s, 4 if s["d_model"] >= 512 else 2))


@register_preset("transformer-mqa", family="full/grouped", paper="Fast Transformer Decoding (arXiv 1911.02150)")
def transformer_mqa(size: str = "small"):
    """Multi-query attention: one KV head shared by all query heads."""
    return pure_config(
        "transformer-mqa", "attn", size, options=lambda s: {"n_heads": _heads(s)["n_heads"], "n_kv_heads": 1}
    )
