"""effarch: efficient LLM architectures (linear, sparse, full attention, MoE, hybrid, diffusion) in one library."""

from effarch.models.config import ModelConfig
from effarch.models.lm import CausalLM, ModelOutput, build_model
from effarch.registry import (
    list_ffns,
    list_mixers,
    list_presets,
    register_ffn,
    register_mixer,
    register_preset,
)

__version__ = "0.1.0"

__all__ = [
    "ModelConfig",
    "CausalLM",
    "ModelOutput",
    "build_model",
    "list_mixers",
    "list_ffns",
    "list_presets",
    "register_mixer",
    "register_ffn",
    "register_preset",
]
