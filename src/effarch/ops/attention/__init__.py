"""Dense softmax attention over [B, T, H, D] tensors: a float64-capable reference and the SDPA path."""

from effarch.ops.attention.dense import attention, attention_mask, attention_reference

__all__ = ["attention", "attention_mask", "attention_reference"]
