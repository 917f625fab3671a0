"""Selective scan (Mamba1) on the GPU: the Triton kernels against the PyTorch form, and both against the chunked
linear recurrence at the same state size per sequence.

One run: (1) correctness, bf16 inputs, Triton and PyTorch forms against the float64 reference at T = 256
(outputs, final states, every gradient); (2) forward and forward+backward at B*T = 32K tokens (T = 2K, 8K, 32K),
D = 2048 channels, N = 16 states (Mamba at d_model 1024), bf16, median of triton.testing.do_bench, first call
included separately; (3) the chunked linear recurrence with scalar decay (Mamba2's form) holding the same
D x N = 32K state floats per sequence (H = 8 heads of K = V = 64), the yardstick of "more than 3x slower per
token than the chunked linear kernels" that decides whether the scan needs its own kernel.
On the CPU (`--device cpu --T 64 --D 32`) it is a smoke run of every code path.
Usage: python benchmarks/scan_ops.py [--T 2048,8192,32768] [--D 2048] [--N 16] [--device cuda|cpu] [--write]
       [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F
from results import append_section, environment

from effarch.ops.linear import linear_recurrence
from effarch.ops.scan import selective_scan

TOKENS = 32768


def inputs(B: int, T: int, D: int, N: int, device, dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    x, dt, z = r(B, T, D), r(B, T, D) - 2.0, r(B, T, D)
    A = -torch.exp(r(D, N) * 0.5)
    Bm, Cm = r(B, T, N), r(B, T, N)
    Dd, bias = r(D), r(D) * 0.1
    act = [t.to(device, dtype) for t in (x, dt, Bm, Cm, z)]
    par = [t.to(device, torch.float32) for t in (A, Dd, bias)]
    return act, par


def call(backend: str, act, par, final: bool = False):
    x, dt, Bm, Cm, z = act
    A, Dd, bias = par
    return selective_scan(
        x, dt, A, Bm, Cm, Dd, z, dt_bias=bias, dt_softplus=True, output_final_state=final, backend=backend
    )


def with_grads(backend: str, act, par) -> dict:
    leaves = [t.detach().clone().requires_grad_() for t in (*act, *par)]
    y, h = call(backend, leaves[:5], leaves[5:], final=True)
    g = torch.Generator(device="cpu").manual_seed(1)
    dy, dh = torch.randn(y.shape, generator=g).to(y.device), torch.randn(h.shape, generator=g).to(h.device)
    grads = torch.autograd.grad((y.double() * dy).sum() + (h.double() * dh).sum(), leaves)
    names = ["x", "dt", "B", "C", "z", "A", "D", "dt_bias"]
    return {"y": y, "final": h, **{f"d{n}": gr for n, gr in zip(names, grads)}}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check(device, backends, D: int, N: int) -> list[str]:
    act, par = inputs(2, 256, D, N, device, torch.bfloat16)
    ref_act = [t.double() for t in act]
    ref_par = [t.double() for t in par]
    ref = with_grads("reference", ref_act, ref_par)
    rows = []
    for backend in backends:
        ours = with_grads(backend, act, par)
        errs = {n: rel(ours[n], ref[n]) for n in ref}
        bad = [n for n, e in errs.items() if not e < 2e-2]
        status = "FAIL " + ",".join(bad) if bad else "ok"
        rows.append(f"| {backend} | " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()) + f" | {status} |")
        print(rows[-1], flush=True)
    return rows


def timer(device):
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")

    def cpu(fn, n=3):
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times)

    return cpu


def first_call(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _scan_grads(backend: str, leaves: list[torch.Tensor], dy: torch.Tensor):
    return torch.autograd.grad(call(backend, leaves[:5], leaves[5:])[0], leaves, dy)


def _linear(leaves) -> torch.Tensor:
    q, k, v, ld = leaves
    return linear_recurrence(q, k, v, log_decay=ld)[0]


def _linear_grads(leaves: list[torch.Tensor], do: torch.Tensor):
    return torch.autograd.grad(_linear(leaves), leaves, do)


def _measure(row: dict, fwd, fwd_bwd, device, bench) -> dict:
    row.update(first_fwd_s=first_call(fwd, device), first_bwd_s=first_call(fwd_bwd, device))
    row.update(fwd_ms=bench(fwd), fwd_bwd_ms=bench(fwd_bwd))
    print(row, flush=True)
    return row


def speed(device, backends, Ts, D: int, N: int, tokens: int) -> list[dict]:
    bench = timer(device)
    rows = []
    for T in Ts:
        B = max(1, tokens // T)
        act, par = inputs(B, T, D, N, device, torch.bfloat16)
        leaves = [t.detach().clone().requires_grad_() for t in (*act, *par)]
        dy = torch.randn(B, T, D, device=device, dtype=torch.bfloat16)
        for backend in backends:
            row = {"op": f"selective scan, {backend}", "T": T, "B": B}
            rows.append(_measure(row, partial(call, backend, act, par), partial(_scan_grads, backend, leaves, dy),
                                 device, bench))  # fmt: skip
        # The chunked linear recurrence holding the same state per sequence: H heads of K = V with H K V = D N.
        K = 64 if D * N >= 8 * 64 * 64 else 16
        H = max(1, D * N // (K * K))
        g = torch.Generator(device="cpu").manual_seed(2)
        q, k, v = (torch.randn(B, T, H, K, generator=g).to(device, torch.bfloat16) for _ in range(3))
        ld = F.logsigmoid(torch.randn(B, T, H, generator=g) + 4).to(device) / 4
        lin_leaves = [t.clone().requires_grad_() for t in (q, k, v, ld)]
        do = torch.randn(B, T, H, K, device=device, dtype=torch.bfloat16)
        row = {"op": f"chunked linear recurrence, scalar decay, {H} x {K} x {K} state", "T": T, "B": B}
        rows.append(_measure(row, partial(_linear, (q, k, v, ld)), partial(_linear_grads, lin_leaves, do),
                             device, bench))  # fmt: skip
    return rows


def table(check_rows: list[str], rows: list[dict], D: int, N: int, tokens: int) -> str:
    out = [
        f"Correctness, bf16 inputs against the float64 reference (T = 256, D = {D}, N = {N}):",
        "",
        "| backend | relative errors | status |",
        "|---|---|---|",
        *check_rows,
        "",
        f"Speed, B*T = {tokens} tokens, D = {D}, N = {N}, bf16; ms are medians; first = first call in s:",
        "",
        "| op | T | fwd ms | fwd+bwd ms | first fwd s | first bwd s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['op']} | {r['T']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
            f"{r['first_fwd_s']:.2f} | {r['first_bwd_s']:.2f} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", default="2048,8192,32768")
    ap.add_argument("--D", type=int, default=2048)
    ap.add_argument("--N", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=TOKENS, help="B*T per measurement")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--write", action="store_true", help="append a dated section to benchmarks/RESULTS.md")
    ap.add_argument("--json", default=None, help="also write the raw numbers to this file")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but no CUDA device is available (use --device cpu)")
    device = torch.device(args.device)
    try:
        Ts = [int(t) for t in args.T.split(",")]
    except ValueError:
        raise SystemExit(f"--T {args.T!r} must be comma-separated integers") from None
    if min(Ts) < 1 or args.D < 1 or args.N < 1 or args.tokens < 1:
        raise SystemExit("--T, --D, --N and --tokens must be positive")
    backends = ["torch", "triton"] if device.type == "cuda" else ["torch"]
    check_rows = check(device, backends, min(args.D, 256), args.N)
    rows = speed(device, backends, Ts, args.D, args.N, args.tokens)
    text = table(check_rows, rows, args.D, args.N, args.tokens)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": environment(), "check": check_rows, "rows": rows}, f, indent=1)
    if args.write:
        append_section("Selective scan: Triton kernels, PyTorch form, chunked linear recurrence", text)


if __name__ == "__main__":
    main()
