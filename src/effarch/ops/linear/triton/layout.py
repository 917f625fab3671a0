"""How packed tokens are cut into chunks for the Triton kernels: one chunk table for dense and varlen batches.

Every batch is seen as packed sequences: a dense [B, T] batch is B sequences of T tokens laid end to end
(cu_seqlens = 0, T, 2T, ...). Each sequence gets max(1, ceil(L / C)) chunks of C tokens, the last one
possibly short, so no chunk holds two sequences (the same layout as `effarch.ops.linear.parallel.BlockGrid`,
whose block order it matches: chunk c of the table is block c of the packed grid).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from effarch.ops.grid import cached, dense_offsets


@dataclass
class ChunkTable:
    """chunk_tok [NT] first token of each chunk, chunk_eos [NT] end of its sequence (exclusive),
    seq_chunk [N+1] first chunk of each sequence, cu [N+1] token offsets; all int32 on the device."""

    chunk_tok: torch.Tensor
    chunk_eos: torch.Tensor
    seq_chunk: torch.Tensor
    cu: torch.Tensor
    n_chunks: int
    n_seqs: int

    @classmethod
    def build(cls, cu_seqlens: torch.Tensor, dense_len: int, chunk: int) -> ChunkTable:
        """cu_seqlens [N+1] on the device; dense_len = T when every sequence has length T (no host sync
        needed), 0 for a varlen batch (lengths are read on the host once)."""
        device = cu_seqlens.device
        n = cu_seqlens.numel() - 1
        cu = cu_seqlens.to(torch.int32)
        if dense_len > 0:  # a function of the shape alone: built once (effarch.ops.grid.cached)
            per = -(-dense_len // chunk)

            def make():
                c = torch.arange(n * per, device=device, dtype=torch.int32)
                seq = c // per
                tok = seq * dense_len + (c % per) * chunk
                return tok, (seq + 1) * dense_len, dense_offsets(n, per, device, torch.int32)

            tok, eos, seq_chunk = cached(("chunk table", n, dense_len, chunk, str(device)), make)
            return cls(tok, eos, seq_chunk, cu, n * per, n)
        bounds = cu_seqlens.tolist()
        tok, eos, seq_chunk = [], [], [0]
        for i in range(n):
            start, end = bounds[i], bounds[i + 1]
            count = max(1, -(-(end - start) // chunk))
            tok.extend(start + j * chunk for j in range(count))
            eos.extend([end] * count)
            seq_chunk.append(seq_chunk[-1] + count)

        def as_tensor(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.int32, device=device)

        return cls(as_tensor(tok), as_tensor(eos), as_tensor(seq_chunk), cu, len(tok), n)
