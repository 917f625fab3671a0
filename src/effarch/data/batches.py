"""Deterministic batch sources: each batch is a pure function of (seed, step), so resuming is exact."""

from __future__ import annotations

import torch


def _generator(seed: int, step: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step) % (2**63 - 1))
    return g


class StreamBatches:
    """Random windows of a packed token stream; targets are the next tokens (language modelling)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int):
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be a 1-D stream; got shape {tuple(tokens.shape)}")
        if tokens.numel() < seq_len + 2:
            raise ValueError(
                f"the data has {tokens.numel()} tokens, fewer than seq_len + 2 = {seq_len + 2}; use a shorter --seq-len or more data"
            )
        self.tokens, self.seq_len = tokens, seq_len

    def get(self, step: int, batch_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        g = _generator(seed, step)
        starts = torch.randint(0, self.tokens.numel() - self.seq_len - 1, (batch_size,), generator=g)
        idx = starts[:, None] + torch.arange(self.seq_len + 1)
        window = self.tokens[idx]
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()

    def sequential(self, batch_size: int, n_batches: int):
        """Non-overlapping windows from the start (evaluation that covers the data evenly)."""
        T = self.seq_len
        n_rows = (self.tokens.numel() - 1) // T
        rows = min(n_rows, batch_size * n_batches)
        for b in range(0, rows, batch_size):
            r = torch.arange(b, min(b + batch_size, rows))
            idx = r[:, None] * T + torch.arange(T + 1)
            window = self.tokens[idx]
            yield window[:, :-1], window[:, 1:]


class TaskBatches:
    """Rows of a fixed task set (inputs, targets with -100 = ignore), sampled with replacement."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        if inputs.shape != targets.shape or inputs.dim() != 2:
            raise ValueError(
                f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must be equal [N, T] shapes"
            )
        self.inputs, self.targets = inputs, targets
        self.seq_len = inputs.shape[1]

    def get(self, step: int, batch_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        g = _generator(seed, step)
        rows = torch.randint(0, self.inputs.shape[0], (batch_size,), generator=g)
        return self.inputs[rows], self.targets[rows]

    def sequential(self, batch_size: int, n_batches: int):
        n = min(self.inputs.shape[0], batch_size * n_batches)
        for b in range(0, n, batch_size):
            yield self.inputs[b : b + batch_size], self.targets[b : b + batch_size]
