"""Autoregressive decoding over per-layer caches: one prefill call, then one decode step per token.

The same loop serves attention (growing KV caches) and recurrent mixers (fixed-size states).
"""

from __future__ import annotations

import torch

from effarch.cache import Cache, RecurrentState, StaticKVCache
from effarch.cuda_graphs import capture, warm_up


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of logits [B, vocab]; temperature 0 is greedy."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be at least 1")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prefill(model, input_ids: torch.Tensor, chunk_size: int | None = None):
    """Run the prompt; returns (last-position logits [B, vocab], cache).

    With `chunk_size`, the prompt goes in pieces of that many tokens with the cache carried across (the
    split/carry contract makes this equal to one call), so a long prompt never needs activations, or
    attention scores, for all of its tokens at once.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"prefill chunk_size={chunk_size} must be a positive number of tokens")
    T = input_ids.shape[1]
    if chunk_size is None or chunk_size >= T:
        out = model(input_ids, use_cache=True, logits_at=_last(input_ids.shape[1], input_ids.device))
        return out.logits[:, -1], out.cache
    cache = None
    for start in range(0, T, chunk_size):
        piece = input_ids[:, start : start + chunk_size]
        out = model(piece, cache=cache, use_cache=True, logits_at=_last(piece.shape[1], piece.device))
        cache = out.cache
    return out.logits[:, -1], cache


def _last(T: int, device) -> torch.Tensor:
    return torch.tensor([T - 1], device=device)


def decode_step(model, token: torch.Tensor, cache):
    """Feed one token per row [B]; returns (logits [B, vocab], cache)."""
    out = model(token[:, None], cache=cache)
    return out.logits[:, -1], out.cache


class GraphedDecodeStep:
    """A decode step captured once in a CUDA graph and replayed for every token.

    All states must be fixed-size: KV caches become `StaticKVCache` (written in place), and each
    recurrent state's new tensors are copied back into the captured buffers inside the graph. Rows of
    different lengths work too: their per-row `lengths` live on the device and advance inside the graph.
    """

    def __init__(self, model, cache: Cache, batch: int, device: torch.device, warmup: int = 2):
        self.model, self.cache = model, cache
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        saved = _snapshot(cache)  # warm-up steps run for real: undo them afterwards
        warm_up(self._step, device, warmup)
        _restore(cache, saved)
        counts = [(s.length if isinstance(s, StaticKVCache) else None) for s in cache.layers]
        self.graph, self.logits = capture(self._step, device)
        for s, n in zip(cache.layers, counts):  # capturing ran no step: undo its host-side count
            if n is not None:
                s.length = n

    def _step(self) -> torch.Tensor:
        out = self.model(self.token, cache=self.cache)
        for old, new in zip(self.cache.layers, out.cache.layers):
            if isinstance(old, dict):  # RecurrentState: same shapes, copy back in place
                for key, t in new.items():
                    if isinstance(t, torch.Tensor):
                        old[key].copy_(t)
                if getattr(old, "lengths", None) is not None and getattr(new, "lengths", None) is not None:
                    old.lengths.copy_(new.lengths)
        return out.logits[:, -1]

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        self.token.copy_(token[:, None])
        self.graph.replay()
        for s in self.cache.layers:  # host-side token counts do not advance inside a replay
            if isinstance(s, StaticKVCache):
                s.length += 1
            elif isinstance(s, RecurrentState):
                s.seq_len += 1
        return self.logits


def _snapshot(cache: Cache) -> list:
    snap = []
    for s in cache.layers:
        lengths = getattr(s, "lengths", None)
        lengths = None if lengths is None else lengths.clone()
        if isinstance(s, StaticKVCache):
            snap.append(("kv", s.pos.clone(), s.length, lengths))
        elif isinstance(s, dict):
            tensors = {k: t.clone() for k, t in s.items() if isinstance(t, torch.Tensor)}
            snap.append(("rec", tensors, s.seq_len, lengths))
        else:
            snap.append(None)
    return snap


def _restore(cache: Cache, snap: list) -> None:
    for s, saved in zip(cache.layers, snap):
        if saved is None:
            continue
        kind, data, length, lengths = saved
        if kind == "kv":
            s.pos.copy_(data)
            s.length = length
        else:
            for k, t in data.items():
                s[k].copy_(t)
            s.seq_len = length
        if lengths is not None:
            s.lengths.copy_(lengths)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | None = None,
    static_cache: bool = False,
    cuda_graph: bool = False,
    prefill_chunk: int | None = None,
) -> torch.Tensor:
    """Prompt [B, T] -> [B, T + n]; rows that emit `eos_token_id` keep emitting it.

    static_cache: preallocate KV caches to T + n tokens (no reallocation per step). cuda_graph: capture
    the decode step once and replay it (CUDA only; implies static_cache). Token-for-token the same as the
    plain loop up to floating-point summation order. prefill_chunk: feed the prompt in pieces of this
    many tokens (long prompts).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a non-empty [batch, time] tensor; got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if cuda_graph and not input_ids.is_cuda:
        raise ValueError("cuda_graph=True needs the model and input_ids on a CUDA device")
    gen = None
    if seed is not None:
        gen = torch.Generator(device=input_ids.device)
        gen.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        out = [input_ids]
        if max_new_tokens == 0:
            return input_ids
        logits, cache = prefill(model, input_ids, prefill_chunk)
        if static_cache or cuda_graph:
            cache = cache.to_static(input_ids.shape[1] + max_new_tokens, consume=True)
        step = GraphedDecodeStep(model, cache, input_ids.shape[0], input_ids.device) if cuda_graph else None
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for i in range(max_new_tokens):
            tok = sample_next(logits, temperature, top_k, top_p, gen)
            if eos_token_id is not None:
                tok = torch.where(done, torch.full_like(tok, eos_token_id), tok)
                done |= tok == eos_token_id
            out.append(tok[:, None])
            if i + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
                break
            if step is not None:
                logits = step(tok)
            else:
                logits, cache = decode_step(model, tok, cache)
        return torch.cat(out, dim=1)
    finally:
        model.train(was_training)
