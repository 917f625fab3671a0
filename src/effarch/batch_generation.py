"""Batched generation from prompts of different lengths, each row continued as if its prompt were alone.

The prompts are packed into one row with `cu_seqlens` and prefilled in one call, with no padding computed:
recurrent mixers return one state per prompt, attention one cache row per prompt with its own length
(`effarch.cache.KVCache.lengths`), so at decode time every row rotates and masks at its own position.
Each row stops at its own end-of-sequence token; after that it is reported as padding. Prompts of one
length take the plain batched path of `effarch.generate`.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch

from effarch.data.tokenizer import PAD
from effarch.generate import GraphedDecodeStep, decode_step, prefill, sample_next


def prompts_from_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """Hugging Face style padded prompts: input_ids [B, T] and a 0/1 attention_mask [B, T] (1 = prompt
    token; left or right padding) -> each row's prompt tokens, a list of B 1-D tensors."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [batch, time] tensor; got {_describe(input_ids)}")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}; got {_describe(attention_mask)}"
        )
    mask = attention_mask.to(input_ids.device)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (prompt token)")
    counts = mask.sum(1)
    if bool((counts == 0).any()):
        row = int((counts == 0).nonzero()[0])
        raise ValueError(f"attention_mask row {row} has no prompt token; every prompt needs at least one")
    return [row[m.bool()] for row, m in zip(input_ids, mask)]


def _describe(x) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _as_prompts(prompts, device: torch.device) -> list[torch.Tensor]:
    """A list of 1-D token id tensors (or lists), or a [B, T] tensor -> 1-D int64 tensors on `device`."""
    if isinstance(prompts, torch.Tensor) and prompts.dim() == 2:
        prompts = list(prompts)
    if not isinstance(prompts, Sequence) or isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError(f"prompts must be a non-empty list of token id sequences; got {_describe(prompts)}")
    out = []
    for i, p in enumerate(prompts):
        t = torch.as_tensor(p, device=device)
        if t.dim() != 1 or (t.numel() and t.is_floating_point()):
            raise ValueError(f"prompt {i} must be a 1-D sequence of token ids; got {_describe(t)} {t.dtype}")
        if t.numel() == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        out.append(t.long())
    return out


def _prefill_rows(model, prompts: list[torch.Tensor], chunk_size: int | None):
    """Logits after each prompt's last token [B, vocab] and the cache, one row per prompt."""
    lens = [p.numel() for p in prompts]
    if len(set(lens)) == 1:
        return prefill(model, torch.stack(prompts), chunk_size)
    if chunk_size is not None:
        raise ValueError(f"prefill_chunk={chunk_size} needs prompts of one length; got lengths {lens}")
    ends = torch.tensor(list(itertools.accumulate(lens, initial=0)), device=prompts[0].device)
    out = model(torch.cat(prompts)[None], use_cache=True, cu_seqlens=ends, logits_at=ends[1:] - 1)
    return out.logits[0], out.cache


@torch.no_grad()
def generate_padded(
    model,
    prompts,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int = PAD,
    static_cache: bool = False,
    cuda_graph: bool = False,
    prefill_chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Continue B prompts of any lengths as one batch.

    prompts: a list of 1-D token id tensors or lists (or a [B, T] tensor). Returns (tokens, lengths):
    tokens [B, max_new_tokens] the new tokens, `pad_token_id` after a row has emitted `eos_token_id`;
    lengths [B] int64 the new tokens of each row, its end-of-sequence token included. Greedy decoding
    gives each row exactly what the prompt would give alone (up to floating-point summation order); with
    sampling, one generator draws for the whole batch. static_cache, cuda_graph and prefill_chunk are
    those of `effarch.generate.generate` (prefill_chunk only for prompts of one length).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    device = next(model.parameters()).device
    prompts = _as_prompts(prompts, device)
    B = len(prompts)
    if cuda_graph and device.type != "cuda":
        raise ValueError("cuda_graph=True needs the model on a CUDA device")
    tokens = torch.full((B, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
    lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
    if max_new_tokens == 0:
        return tokens, lengths
    gen = None
    if seed is not None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        logits, cache = _prefill_rows(model, prompts, prefill_chunk)
        if static_cache or cuda_graph:
            cache = cache.to_static(max(p.numel() for p in prompts) + max_new_tokens, consume=True)
        step = GraphedDecodeStep(model, cache, B, device) if cuda_graph else None
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for i in range(max_new_tokens):
            tok = sample_next(logits, temperature, top_k, top_p, gen)
            tokens[:, i] = torch.where(done, pad_token_id, tok)
            if eos_token_id is not None:
                stops = ~done & (tok == eos_token_id)
                lengths = torch.where(stops, i + 1, lengths)
                done |= stops
                if bool(done.all()):
                    break
            if i + 1 == max_new_tokens:
                break
            # Rows that stopped keep running on their own samples (always valid ids); their output is padding.
            if step is not None:
                logits = step(tok)
            else:
                logits, cache = decode_step(model, tok, cache)
        return tokens, lengths
    finally:
        model.train(was_training)


def generate_batch(model, prompts, max_new_tokens: int = 64, **kwargs) -> list[torch.Tensor]:
    """Continue prompts of any lengths as one batch; returns each row's new tokens as a 1-D tensor (up to
    and including its end-of-sequence token). Keyword options are those of `generate_padded`."""
    tokens, lengths = generate_padded(model, prompts, max_new_tokens, **kwargs)
    return [row[:n] for row, n in zip(tokens, lengths.tolist())]
