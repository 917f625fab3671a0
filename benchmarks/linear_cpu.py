"""CPU throughput of the chunked linear recurrence against the token-by-token reference.

Usage: python benchmarks/linear_cpu.py [--T 4096] [--repeats 3] [--write]
Prints a markdown table of tokens/s (best of --repeats runs after one warm-up, so that load from
other processes on the machine distorts the figures less); --write appends it as a
dated section to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from effarch.ops.linear import linear_recurrence_chunked, linear_recurrence_reference

CASES = {  # name: (rule, log_decay shape or None)
    "additive, no decay": ("additive", None),
    "additive, scalar decay [B,T,H]": ("additive", "scalar"),
    "additive, per-key decay [B,T,H,K]": ("additive", "per_key"),
    "delta, scalar decay [B,T,H]": ("delta", "scalar"),
}


def make_inputs(rule: str, decay: str | None, B: int, T: int, H: int, K: int, V: int) -> tuple:
    q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)
    shape = {None: None, "scalar": (B, T, H), "per_key": (B, T, H, K)}[decay]
    log_decay = None if shape is None else F.logsigmoid(torch.randn(shape) + 2)
    beta = None
    if rule == "delta":
        k, beta = F.normalize(k, dim=-1), torch.rand(B, T, H)
    return q, k, v, dict(log_decay=log_decay, beta=beta, rule=rule)


def best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def forward_backward(q, k, v, kw) -> None:
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    extra = {n: (t.detach().requires_grad_() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    o, _ = linear_recurrence_chunked(*leaves, **extra)
    o.backward(torch.randn_like(o))  # a dense gradient, as training gives (o.sum() would give a stride-0 one)


def measure(q, k, v, kw: dict, chunk_size: int, repeats: int) -> tuple[float, float, float]:
    """Seconds for the reference forward, the chunked forward and the chunked forward+backward."""
    with torch.no_grad():
        ref = best_seconds(lambda: linear_recurrence_reference(q, k, v, **kw), repeats)
        fwd = best_seconds(lambda: linear_recurrence_chunked(q, k, v, **kw, chunk_size=chunk_size), repeats)
    fb = best_seconds(lambda: forward_backward(q, k, v, {**kw, "chunk_size": chunk_size}), repeats)
    return ref, fwd, fb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--K", type=int, default=64)
    ap.add_argument("--V", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    a = ap.parse_args()
    torch.manual_seed(0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    tokens = a.B * a.T
    rows = [
        "| case | reference fwd (tok/s) | chunked fwd (tok/s) | speed-up | chunked fwd+bwd (tok/s) |",
        "|---|---|---|---|---|",
    ]
    for name, (rule, decay) in CASES.items():
        ref, fwd, fb = measure(*make_inputs(rule, decay, a.B, a.T, a.H, a.K, a.V), a.chunk_size, a.repeats)
        rows.append(f"| {name} | {tokens / ref:,.0f} | {tokens / fwd:,.0f} | {ref / fwd:,.0f}x | {tokens / fb:,.0f} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    print("\n" + table)
    if a.write:
        from results import RESULTS, append_section

        append_section(
            "Linear recurrence on CPU",
            f"1-min load average {load:.1f} at the start; B={a.B}, T={a.T}, H={a.H}, K={a.K}, V={a.V}, float32, "
            f"chunk {a.chunk_size}; best of {a.repeats} runs after a warm-up. `benchmarks/linear_cpu.py`.\n\n{table}",
        )
        print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
