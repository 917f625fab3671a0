"""State-space model presets: Mamba (selective SSM) stacks, two mixer-only blocks per Transformer layer."""

from effarch.models.presets._sizes import SIZES, pure_config
from effarch.registry import register_preset


@register_preset(
    "mamba",
    family="linear/ssm",
    paper="Mamba: Linear-Time Sequence Modeling with Selective State Spaces (arXiv 2312.00752)",
)
def mamba(size: str = "small"):
    """Mamba-1 blocks without FFNs, twice as many layers as a Transformer of the same size (as in the paper)."""
    s = SIZES[size]
    return pure_config("mamba", "mamba", size, ffn="none", layers=f"mamba*{2 * s['n_layers']}")
