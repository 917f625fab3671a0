"""Timing helpers shared by `effarch bench` and the scripts in benchmarks/: training-step and generation
throughput of any model (effarch's or a peer's), with peak memory, measured the same way for all.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from effarch.cuda_graphs import capture, warm_up

RESULTS_TITLE = "# effarch benchmark results\n"


def environment() -> dict:
    """Date, device and library versions of this machine, as every benchmark section records them."""
    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "python": platform.python_version()}
    for mod in ("triton", "fla", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional peers; any import failure means "not measured"
            env[mod] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    else:
        env["cpu"] = f"{_cpu_name()} ({torch.get_num_threads()} threads)"
    return env


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def append_results(path: str | os.PathLike, title: str, body: str) -> str:
    """Append `## date - title`, the environment line and `body` to a results markdown file (atomically);
    returns the section."""
    from pathlib import Path

    from effarch.utils import atomic_write_text

    env = environment()
    device = env.get("gpu") or env.get("cpu")
    versions = ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("date", "gpu", "cpu") and v)
    section = f"## {env['date']} - {title}\n\n{device}; {versions}\n\n{body.rstrip()}\n"
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else RESULTS_TITLE
    atomic_write_text(path, old.rstrip("\n") + "\n\n" + section)
    return section


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_train_step(
    model: torch.nn.Module,
    loss_of: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
    *,
    batch: int,
    seq_len: int,
    vocab_size: int,
    steps: int = 10,
    warmup: int = 3,
    lr: float = 1e-4,
    cuda_graph: bool = False,
    phases: bool = True,
) -> dict:
    """Median time of one training step (forward, backward, AdamW; fused on CUDA) on random tokens.

    `loss_of(model, ids)` returns the scalar loss. Returns tokens/s, step ms, the host's issue ms (the time
    until the step's last launch returns: close to step ms, the step is bound by the host; then cuda_graph helps)
    and peak memory bytes (CUDA).
    Out-of-memory is reported as {"oom": True}. cuda_graph: the step (AdamW included) captured once after the
    warm-up steps and replayed, so the host's launches are out of the timing; a model that syncs with the host
    cannot be captured and raises.
    """
    device = next(model.parameters()).device
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a model on a CUDA device; this one is on {device.type}")
    fused = device.type == "cuda" or None
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=fused, capturable=cuda_graph)
    ids = torch.randint(0, vocab_size, (batch, seq_len), device=device)

    def step() -> None:
        loss_of(model, ids).backward()
        opt.step()

    def eager() -> None:
        step()
        opt.zero_grad(set_to_none=True)

    times, issued = [], []
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        run = eager
        if cuda_graph:  # gradients allocated inside the graph's pool, then written (not added) by each replay
            warm_up(eager, device, max(warmup, 1))
            graph, _ = capture(step, device)
            run, warmup = graph.replay, 0
        for i in range(warmup + steps):
            _sync(device)
            t0 = time.perf_counter()
            run()
            t1 = time.perf_counter()
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                issued.append(t1 - t0)
    except torch.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"oom": True, "batch": batch, "seq_len": seq_len}
    step_s = statistics.median(times)
    # eager: one more step timed phase by phase (`step_phases`), unless phases=False
    split = step_phases(model, loss_of, opt, ids) if phases and not cuda_graph else None
    out = {
        "batch": batch,
        "seq_len": seq_len,
        "step_ms": 1e3 * step_s,
        # the host's time to issue the step (until AdamW returns); near step_ms, the host sets the pace
        "issue_ms": 1e3 * statistics.median(issued),
        "tokens_per_s": batch * seq_len / step_s,
        "peak_mem_bytes": int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None,
        "phases": split,
    }
    return out


def step_phases(model, loss_of, opt, ids) -> dict:
    """One more step, its forward, backward and optimizer step run one at a time with the device synced before and
    after each: "*_host_ms" is the host's time to issue the phase (until its last launch returns), "*_ms" the time
    until the device has run it too. A phase whose host time is close to its whole time kept the device waiting on
    the host (host-paced); one whose host time is well below it was paced by the device. (Timing the device alone
    behind a device-side sleep does not work for long phases: the host blocks once the launch queue is full, after
    about a thousand launches, and from then on issues at the device's pace.)"""
    device = ids.device
    out = {}

    def timed(name: str, fn: Callable[[], object]):
        _sync(device)
        t0 = time.perf_counter()
        result = fn()
        t1 = time.perf_counter()
        _sync(device)
        out[f"{name}_host_ms"], out[f"{name}_ms"] = 1e3 * (t1 - t0), 1e3 * (time.perf_counter() - t0)
        return result

    loss = timed("forward", lambda: loss_of(model, ids))
    timed("backward", loss.backward)
    timed("optimizer", opt.step)
    opt.zero_grad(set_to_none=True)
    return out


def phase_summary(phases: dict | None) -> str:
    """ "phases synced apart, issued in / run in: forward 70 / 75 ms, ..." from `step_phases`; "" for None."""
    if not phases:
        return ""
    parts = [
        f"{n} {phases[f'{n}_host_ms']:.0f} / {phases[f'{n}_ms']:.0f}" for n in ("forward", "backward", "optimizer")
    ]
    return "phases synced apart, issued in / run in: " + ", ".join(parts) + " ms"


def measure_generate(
    generate: Callable[[torch.Tensor, int], torch.Tensor],
    *,
    batch: int,
    prompt_len: int,
    new_tokens: int,
    vocab_size: int,
    device: torch.device,
    repeats: int = 3,
) -> dict:
    """Median wall time of `generate(prompt, new_tokens)`; new tokens/s = batch * new_tokens / time."""
    prompt = torch.randint(0, vocab_size, (batch, prompt_len), device=device)
    generate(prompt, min(new_tokens, 8))  # warm-up (allocations, graph capture, compilation)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        out = generate(prompt, new_tokens)
        _sync(device)
        times.append(time.perf_counter() - t0)
        if out.shape[1] != prompt_len + new_tokens:
            raise RuntimeError(f"generation returned {out.shape[1] - prompt_len} new tokens, not {new_tokens}")
    t = statistics.median(times)
    return {
        "batch": batch,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "s": t,
        "tokens_per_s": batch * new_tokens / t,
    }


def measure_decode_latency(
    model,
    *,
    batch: int,
    context: int,
    vocab_size: int,
    device: torch.device,
    cuda_graph: bool = False,
    static_cache: bool = False,
    prefill_chunk: int | None = None,
    steps: int = 20,
) -> dict:
    """Per-token decode latency after a prompt of `context` tokens (ms), cache bytes at that context.

    cuda_graph: replay a captured decode step (CUDA; implies static_cache). static_cache: KV caches preallocated
    and written in place. prefill_chunk: feed the prompt in pieces of this many tokens, so long prompts at large
    batch never hold logits for every prompt token at once.
    """
    from effarch.generate import GraphedDecodeStep, decode_step, prefill

    prompt = torch.randint(0, vocab_size, (batch, context), device=device)
    with torch.no_grad():
        logits, cache = prefill(model, prompt, prefill_chunk)
        del prompt
        if cuda_graph or static_cache:
            cache = cache.to_static(context + steps + 4, consume=True)
        if cuda_graph:
            step = GraphedDecodeStep(model, cache, batch, device)
        tok = logits.argmax(-1)
        times = []
        for _ in range(steps):
            _sync(device)
            t0 = time.perf_counter()
            if cuda_graph:
                logits = step(tok)
            else:
                logits, cache = decode_step(model, tok, cache)
            _sync(device)
            times.append(time.perf_counter() - t0)
    return {"batch": batch, "context": context, "ms": 1e3 * statistics.median(times), "cache_bytes": cache.nbytes()}


def bench_model(
    what: str,
    spec: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    batch: int | None = None,
    seq_len: int = 1024,
    steps: int = 5,
    prompt_len: int = 128,
    new_tokens: int = 64,
    compile_blocks: bool = False,
    cuda_graph: bool = False,
) -> str:
    """`effarch bench train|generate` for a preset or config file; returns a one-line report."""
    from effarch.models.lm import CausalLM
    from effarch.models.presets import resolve_config
    from effarch.utils import default_device

    dev = default_device() if device == "auto" else torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available")
    if cuda_graph and dev.type != "cuda":
        raise ValueError("--cuda-graph needs a CUDA device")
    for name, v in (("seq_len", seq_len), ("steps", steps), ("prompt_len", prompt_len), ("new_tokens", new_tokens)):
        if v < 1:
            raise ValueError(f"{name}={v} must be a positive integer")
    config = resolve_config(spec)
    dt = torch.bfloat16 if (dtype == "bf16" or (dtype == "auto" and dev.type == "cuda")) else torch.float32
    torch.manual_seed(0)
    model = CausalLM(config).to(dev, dt)
    n = model.num_parameters()
    if what == "train":
        if compile_blocks:
            from effarch.compile import compile_model

            compile_model(model)
        b = batch or 4
        r = measure_train_step(
            model,
            lambda m, ids: m(ids, targets=ids.roll(-1, 1), return_logits=False).loss,
            batch=b,
            seq_len=seq_len,
            vocab_size=config.vocab_size,
            steps=steps,
            warmup=2,
            cuda_graph=cuda_graph,
        )
        if r.get("oom"):
            return f"{config.name or spec}: out of memory at batch {b} x {seq_len}"
        mem = "" if r["peak_mem_bytes"] is None else f", peak {r['peak_mem_bytes'] / 2**30:.2f} GiB"
        flops = model.flops_per_token(seq_len) * 3 * r["tokens_per_s"]
        return (
            f"{config.name or spec} ({n / 1e6:.1f}M params, {dt}, {dev.type}): train {b} x {seq_len}"
            f"{' (CUDA graph)' if cuda_graph else ''}: "
            f"{r['tokens_per_s']:,.0f} tokens/s, {r['step_ms']:.1f} ms/step (the host issues it in "
            f"{r['issue_ms']:.1f}), {flops / 1e12:.2f} TFLOP/s{mem}"
            + (f"; {phase_summary(r['phases'])}" if r["phases"] else "")
        )
    if what == "generate":
        b = batch or 1
        model.eval()
        r = measure_generate(
            lambda p, k: model.generate(p, k, temperature=0, cuda_graph=cuda_graph),
            batch=b,
            prompt_len=prompt_len,
            new_tokens=new_tokens,
            vocab_size=config.vocab_size,
            device=dev,
        )
        cache = sum(model.cache_nbytes(prompt_len + new_tokens, b, dt))
        return (
            f"{config.name or spec} ({n / 1e6:.1f}M params, {dt}, {dev.type}): generate batch {b}, prompt "
            f"{prompt_len}, {new_tokens} new: {r['tokens_per_s']:,.1f} new tokens/s, cache {cache / 2**20:.2f} MiB"
        )
    raise ValueError(f"bench {what!r} is not one of 'ops', 'train', 'generate'")
