"""The token-mixer contract every architecture implements (see DESIGN: "The contracts everything plugs into").

A mixer maps x [B, T, d_model] to y of the same shape and carries an inference state:
`forward(x, state=None, *, cu_seqlens=None) -> (y, new_state)`. The same call serves training
(state None, whole sequence), prefill and decoding (T = 1). Running a sequence in one call must equal
running it in pieces with the state carried across.
"""

from __future__ import annotations

import torch
from torch import nn


class TokenMixer(nn.Module):
    """Base class: holds d_model, direction and layer index; subclasses implement `forward`."""

    def __init__(self, d_model: int, *, causal: bool = True, layer_idx: int = 0):
        super().__init__()
        if d_model <= 0:
            raise ValueError(f"d_model must be positive; got {d_model}")
        self.d_model = d_model
        self.causal = causal
        self.layer_idx = layer_idx

    def forward(self, x: torch.Tensor, state=None, *, cu_seqlens: torch.Tensor | None = None):
        raise NotImplementedError

    def state_nbytes(self, seq_len: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes of inference state after `seq_len` tokens (KV caches grow, recurrent states do not)."""
        raise NotImplementedError

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token at context `seq_len`, excluding projections counted by parameters."""
        return 0.0


def check_divisible(what: str, value: int, by_what: str, by: int) -> None:
    """One-sentence error when a dimension does not split evenly."""
    if by <= 0 or value % by:
        raise ValueError(f"{what} = {value} must be a positive multiple of {by_what} = {by}")
