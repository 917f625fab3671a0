"""`effarch bench ops`: op-level kernels side by side, appended to benchmarks/RESULTS.md.

Dense causal attention: ours (effarch.ops.attention) against PyTorch's scaled_dot_product_attention called
directly and, on CUDA, FlexAttention; our linear recurrence against flash-linear-attention's chunked
kernels when that package is installed. The repository's own scripts for the linear recurrence
(benchmarks/linear_ops.py on GPU, benchmarks/linear_cpu.py on CPU) are run too when present.
FLOPs: causal attention forward 2·B·H·D·T², forward + backward 3.5 × forward.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from effarch.benchmarking import append_results

# (op, device) -> (dtype, heads, head dim, tokens per call B*T, lengths T, repetitions on CPU)
SHAPES = {
    ("attention", "cuda"): (torch.bfloat16, 16, 128, 32768, (2048, 8192, 32768), 10),
    ("attention", "cpu"): (torch.float32, 4, 64, 2048, (512, 2048), 3),
    ("linear", "cuda"): (torch.bfloat16, 16, 128, 32768, (2048, 8192), 10),
    ("linear", "cpu"): (torch.float32, 4, 64, 2048, (512, 2048), 3),
}


def _time_ms(fn, device: torch.device, reps: int) -> float:
    """Median milliseconds of fn(); triton's do_bench on CUDA when available."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=25, rep=100))
        except ImportError:
            pass
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _fwd_bwd(f, *xs):
    def run():
        for x in xs:
            x.grad = None
        f().float().sum().backward()

    return run


def _measure(cands: dict, label: str, device: torch.device, reps: int, flops: float | None) -> list[list[str]]:
    """One row per candidate: name -> (function returning the output, its differentiable inputs)."""
    rows = []
    for name, (f, xs) in cands.items():
        try:
            with torch.no_grad():
                fwd = _time_ms(f, device, reps)
            both = _time_ms(_fwd_bwd(f, *xs), device, reps)
        except Exception as e:  # a backend refusing a shape (or a version guard) is a result, not a crash
            rows.append([name, label, "failed", type(e).__name__, "", ""])
            continue
        tokens = float(label.split(" × ")[0].replace(",", "")) * float(label.split(" × ")[1])
        # ms in the denominator: FLOP / ms / 1e9 = TFLOP/s
        rate = "–" if flops is None else f"{flops / fwd / 1e9:.3g} / {3.5 * flops / both / 1e9:.3g}"
        rows.append([name, label, f"{fwd:.3f}", f"{both:.3f}", f"{tokens / both / 1e3:.2f}", rate])
    return rows


def _attention_candidates(B: int, T: int, H: int, D: int, dtype, device: torch.device, flex) -> dict:
    from effarch.ops.attention import attention

    q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    cands = {
        "effarch attention": (lambda: attention(q, k, v, causal=True), (q, k, v)),
        "SDPA causal": (lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True), (qt, kt, vt)),
    }
    if flex is not None:
        fn, make_mask = flex
        mask = make_mask(lambda b, h, qi, kj: qi >= kj, None, None, T, T, device=device)
        cands["FlexAttention causal"] = (lambda: fn(qt, kt, vt, block_mask=mask), (qt, kt, vt))
    return cands


def attention_rows(device: torch.device) -> tuple[str, list[list[str]]]:
    """Causal attention forward and forward+backward at growing T (B*T fixed)."""
    dtype, H, D, tokens, lengths, reps = SHAPES[("attention", device.type)]
    flex = None
    if device.type == "cuda":
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            flex = (torch.compile(flex_attention), create_block_mask)
        except Exception:  # FlexAttention is missing or cannot compile here: its rows are left out
            flex = None
    rows = []
    for T in lengths:
        B = max(1, tokens // T)
        cands = _attention_candidates(B, T, H, D, dtype, device, flex)
        rows += _measure(cands, f"{T:,} × {B}", device, reps, 2.0 * B * H * D * T * T)
    header = f"causal attention, H = {H}, D = {D}, {str(dtype).replace('torch.', '')}, B·T = {tokens:,}"
    return header, rows


def _linear_candidates(B: int, T: int, H: int, K: int, dtype, device: torch.device) -> dict:
    from effarch.ops.linear import linear_recurrence

    q, k, v = (torch.randn(B, T, H, K, device=device, dtype=dtype) for _ in range(3))
    q, k = (F.normalize(x.float(), dim=-1).to(dtype) for x in (q, k))
    g = F.logsigmoid(torch.randn(B, T, H, K, device=device) + 4) / 16  # GLA-style per-key decay, fp32
    beta = torch.rand(B, T, H, device=device, dtype=dtype)
    xs = tuple(t.requires_grad_() for t in (q, k, v, g, beta))
    cands = {
        "effarch linear_recurrence (per-key decay)": (lambda: linear_recurrence(q, k, v, log_decay=g)[0], xs[:4]),
        "effarch linear_recurrence (delta rule)": (
            lambda: linear_recurrence(q, k, v, beta=beta, rule="delta")[0],
            (q, k, v, beta),
        ),
    }
    if device.type == "cuda":
        try:
            from fla.ops.delta_rule import chunk_delta_rule
            from fla.ops.gla import chunk_gla
        except Exception:  # fla is optional: without it only our rows are measured
            return cands
        cands["fla chunk_gla"] = (lambda: chunk_gla(q, k, v, g)[0], xs[:4])
        cands["fla chunk_delta_rule"] = (lambda: chunk_delta_rule(q, k, v, beta)[0], (q, k, v, beta))
    return cands


def linear_rows(device: torch.device) -> tuple[str, list[list[str]]]:
    """Our linear recurrence against flash-linear-attention's chunked kernels (when installed)."""
    dtype, H, K, tokens, lengths, reps = SHAPES[("linear", device.type)]
    rows = []
    for T in lengths:
        B = max(1, tokens // T)
        rows += _measure(_linear_candidates(B, T, H, K, dtype, device), f"{T:,} × {B}", device, reps, None)
    header = f"linear recurrence, H = {H}, K = V = {K}, {str(dtype).replace('torch.', '')}, B·T = {tokens:,}"
    return header, rows


def _benchmarks_dir() -> Path:
    here = Path.cwd() / "benchmarks"
    if here.is_dir():
        return here
    return Path(__file__).resolve().parents[3] / "benchmarks"


def _environment(device: torch.device) -> str:
    from effarch.arena.store import machine_info, versions

    m, v = machine_info(), versions()
    hw = m.get("gpu") if device.type == "cuda" else f"{m['processor']} ({m['torch_threads']} threads)"
    return f"{hw}; torch {v['torch']}, triton {v['triton']}, fla {v['fla']}, effarch {v['effarch']}"


def run_ops_bench(device: str = "auto", results: str | None = None, write: bool = True, scripts: bool = True) -> str:
    """Measure, print the markdown, append it to the results file; returns the markdown."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device!r} asks for CUDA and this machine has none; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device {device!r} is not one of auto, cpu, cuda")
    dev = torch.device(device)
    header = ["op", "T × B", "fwd ms", "fwd+bwd ms", "Mtok/s fwd+bwd", "TFLOP/s fwd / fwd+bwd"]
    parts = []
    for measure in (attention_rows, linear_rows):
        title, rows = measure(dev)
        parts += [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        parts += ["| " + " | ".join(r) + " |" for r in rows] + [""]
    text = "\n".join(parts)
    path = Path(results) if results else _benchmarks_dir() / "RESULTS.md"
    title = f"effarch bench ops ({dev.type})"
    if write:
        text = append_results(path, title, text)
        print(text)
        print(f"appended to {path}")
    else:
        print(f"{title}\n\n{_environment(dev)}\n\n{text}")
    if scripts:
        script = _benchmarks_dir() / ("linear_ops.py" if dev.type == "cuda" else "linear_cpu.py")
        if script.is_file():
            # The scripts append their own dated sections with --write.
            cmd = [sys.executable, str(script)] + (["--write"] if write else [])
            subprocess.run(cmd, check=False)
    return text
