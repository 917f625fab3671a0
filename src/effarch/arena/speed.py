"""Speed and memory cells: training throughput and peak memory against sequence length, prefill latency,
per-token decode latency against context, and inference cache bytes against context.

Timings are medians over `repeats` after one untimed warm-up (which doubles as the memory measurement);
on CUDA every timing is bracketed by synchronisation. Inputs are random token ids: speed does not
depend on the data.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch

from effarch.arena.memory import PeakMemory, module_bytes
from effarch.models.config import ModelConfig
from effarch.models.lm import CausalLM


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def _build(config: ModelConfig, length: int, device: torch.device, seed: int) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(replace(config, max_seq_len=max(config.max_seq_len, length))).to(device)


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def train_step_cell(
    config: ModelConfig,
    length: int,
    *,
    tokens: int,
    repeats: int,
    time_cap_s: float,
    device: torch.device,
    seed: int = 0,
) -> dict:
    """One training step (forward, backward, AdamW) on batch = tokens // length rows of `length` tokens."""
    from effarch.train import TrainConfig, loss_fn, make_optimizer

    batch = max(1, tokens // length)
    record = {"length": length, "batch": batch, "tokens": batch * length}
    model = None
    try:
        model = _build(config, length, device, seed)
        opt = make_optimizer(model, TrainConfig(lr=1e-4))
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, config.vocab_size, (batch, length + 1), generator=g).to(device)
        inputs, targets = x[:, :-1], x[:, 1:]

        def step():
            with _autocast(device):
                loss, aux = loss_fn(model, inputs, targets)
            (loss + aux).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        with PeakMemory(device, baseline=module_bytes(model)) as mem:
            t0 = time.perf_counter()
            step()
            _sync(device)
            first = time.perf_counter() - t0
        record.update(peak_mem_bytes=mem.peak_bytes, mem_method=mem.method, first_step_s=first)
        if first > 3 * time_cap_s:  # far too slow even allowing for one-time set-up
            return {
                **record,
                "status": "too_slow",
                "note": f"the first step took {first:.1f} s > 3 x {time_cap_s:.1f} s",
            }
        times = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - t0)
            # The first step carries one-time set-up (kernel choice, allocation), so the second decides.
            if times[0] > time_cap_s:
                return {**record, "status": "too_slow", "note": f"one step took {times[0]:.1f} s > {time_cap_s:.1f} s"}
        step_s = statistics.median(times)
        flops = 3.0 * model.flops_per_token(length) * batch * length  # forward + backward = 3 forwards
        return {
            **record,
            "status": "ok",
            "step_s": step_s,
            "tokens_per_s": batch * length / step_s,
            "tflops": flops / step_s / 1e12,
            "step_times_s": times,
        }
    except RuntimeError as e:
        if _is_oom(e):
            return {**record, "status": "oom", "note": "out of memory"}
        raise
    finally:
        model = None  # free the weights before the next cell
        _release(device)


@torch.no_grad()
def inference_cell(
    config: ModelConfig,
    length: int,
    *,
    decode_tokens: int,
    repeats: int,
    time_cap_s: float,
    device: torch.device,
    seed: int = 0,
) -> dict:
    """Prefill a `length`-token prompt (batch 1), then decode `decode_tokens` tokens one at a time."""
    from effarch.generate import decode_step

    record = {"length": length, "batch": 1}
    model = None
    try:
        model = _build(config, length + decode_tokens + 1, device, seed).eval()
        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, config.vocab_size, (1, length), generator=g).to(device)
        last = torch.tensor([length - 1], device=device)  # a prefill needs only the last position's logits
        prefill_times, out = [], None
        for r in range(repeats + 1):  # the first call is the warm-up
            out = None
            _sync(device)
            t0 = time.perf_counter()
            with _autocast(device):
                out = model(prompt, use_cache=True, logits_at=last)
            _sync(device)
            dt = time.perf_counter() - t0
            if r == 1 and dt > time_cap_s:  # the second call decides, the first carries one-time set-up
                return {**record, "status": "too_slow", "note": f"prefill took {dt:.1f} s > {time_cap_s:.1f} s"}
            if r > 0:
                prefill_times.append(dt)
        cache = out.cache
        record["cache_bytes_measured"] = cache.nbytes()
        token = out.logits[:, -1].argmax(-1)
        decode_times = []
        for i in range(decode_tokens + 1):  # step 0 is the warm-up
            _sync(device)
            t0 = time.perf_counter()
            with _autocast(device):
                logits, cache = decode_step(model, token, cache)
            _sync(device)
            if i > 0:
                decode_times.append(time.perf_counter() - t0)
            token = logits.argmax(-1)
        prefill_s = statistics.median(prefill_times)
        record.update(
            status="ok",
            prefill_s=prefill_s,
            prefill_tokens_per_s=length / prefill_s,
            decode_s_per_token=statistics.median(decode_times),
            decode_times_s=decode_times,
        )
        if device.type == "cuda":
            record.update(_graphed_decode(model, cache, token, decode_tokens, length, device))
        return record
    except RuntimeError as e:
        if _is_oom(e):
            return {**record, "status": "oom", "note": "out of memory"}
        raise
    finally:
        model = None  # free the weights before the next cell
        _release(device)


def _graphed_decode(model, cache, token, decode_tokens: int, length: int, device: torch.device) -> dict:
    """Per-token latency of the decode step captured in a CUDA graph over static caches (how a server
    decodes); a mixer that cannot be captured leaves a note instead."""
    from effarch.generate import GraphedDecodeStep

    try:
        static = cache.to_static(length + 2 * decode_tokens + 8)
        with _autocast(device):
            step = GraphedDecodeStep(model, static, 1, device)
        times = []
        for _ in range(decode_tokens):
            _sync(device)
            t0 = time.perf_counter()
            token = step(token).argmax(-1)
            _sync(device)
            times.append(time.perf_counter() - t0)
        return {"decode_graph_s_per_token": statistics.median(times)}
    except Exception as e:  # capture is optional: the eager figure above stands
        if _is_oom(e):
            raise
        return {"decode_graph_note": f"{type(e).__name__}: {e}"[:300]}


def cache_cell(config: ModelConfig, lengths: tuple[int, ...], dtype: torch.dtype = torch.bfloat16) -> dict:
    """Inference cache bytes (batch 1) after each context length, from the mixers' own accounting;
    built on the meta device, so no memory is used."""
    with torch.device("meta"):
        model = CausalLM(config)
    per_layer = {str(n): model.cache_nbytes(n, 1, dtype) for n in lengths}
    return {
        "status": "ok",
        "dtype": str(dtype).replace("torch.", ""),
        "cache_bytes": {n: sum(v) for n, v in per_layer.items()},  # keys are str, as JSON keeps them
        "cache_bytes_per_layer": per_layer,
        "params": model.num_parameters(),
        "params_no_embedding": model.num_parameters(exclude_embeddings=True),
        "flops_per_token": {str(n): model.flops_per_token(n) for n in lengths},
    }
