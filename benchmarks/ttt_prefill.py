"""TTT-Linear prefill without gradients: the PyTorch mini-batch loop against the Triton kernel on the same layer and
inputs (time per layer call, relative difference of the outputs).

The loop launches a dozen kernels per mini-batch; the kernel walks every mini-batch of a (sequence, head) in one
program with the fast weights in registers. On the CPU (`--device cpu` under TRITON_INTERPRET=1, small shapes) it is
a smoke run of both paths.
Usage: python benchmarks/ttt_prefill.py [--shapes 1x4096,1x16384,8x2048] [--d-model 1024] [--heads 16]
       [--device cuda|cpu] [--repeat 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from results import environment, parse_shapes

import effarch.ops.ttt as ttt_dispatch
from effarch.layers.mixers.ttt import TTTLinear

KERNEL_CALLS = [0]


def count_kernel_calls(on_cpu: bool) -> None:
    """Count the layer's calls that reach the kernel (a kernel that failed to build would fall back to the loop
    unseen). On the CPU the dispatch is told the tensors may take the kernel: it runs under the interpreter."""
    load = ttt_dispatch._load

    def counting_load():
        loaded = load()
        if isinstance(loaded, ImportError):
            return loaded
        kernel, supports = loaded

        def counted(*args, **kwargs):
            KERNEL_CALLS[0] += 1
            return kernel(*args, **kwargs)

        return counted, supports

    ttt_dispatch._load = counting_load
    if on_cpu:
        ttt_dispatch._on_gpu = lambda x: True


def timed(layer: TTTLinear, x: torch.Tensor, use_kernel: bool, repeat: int) -> tuple[float, torch.Tensor]:
    """Mean ms per call after one untimed call, and the output."""
    ttt_dispatch.AUTO_TRITON = use_kernel
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.no_grad():
        out = layer(x)
        sync()
        t0 = time.perf_counter()
        for _ in range(repeat):
            layer(x)
        sync()
    return (time.perf_counter() - t0) / repeat * 1e3, out[0] if isinstance(out, tuple) else out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="1x4096,1x16384,8x2048", help="BATCHxTOKENS,...")
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--mini-batch", type=int, default=16)
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    shapes = parse_shapes(args.shapes, fields="BATCHxTOKENS", example="1x4096,8x2048")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible; use --device cpu (under TRITON_INTERPRET=1)")
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--device cpu runs the kernel under the Triton interpreter: set TRITON_INTERPRET=1")
    count_kernel_calls(device == "cpu")
    torch.manual_seed(0)
    rows = []
    print("| batch x tokens | PyTorch loop ms | Triton ms | speed-up | relative difference |")
    print("|---|---|---|---|---|")
    for B, T in shapes:
        layer = TTTLinear(args.d_model, n_heads=args.heads, mini_batch_size=args.mini_batch).to(device)
        x = torch.randn(B, T, args.d_model, device=device)
        loop_ms, ref = timed(layer, x, False, args.repeat)
        calls = KERNEL_CALLS[0]
        kernel_ms, out = timed(layer, x, True, args.repeat)
        if KERNEL_CALLS[0] == calls:
            raise SystemExit(
                f"the TTT kernel did not run at {B} x {T} (it fell back to the loop; see the warning above)"
            )
        diff = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        rows.append(dict(batch=B, tokens=T, loop_ms=loop_ms, kernel_ms=kernel_ms, rel_diff=diff,
                         kernel_calls=KERNEL_CALLS[0] - calls))  # fmt: skip
        print(
            f"| {B} x {T:,} | {loop_ms:.1f} | {kernel_ms:.1f} | {loop_ms / kernel_ms:.1f}x | {diff:.1e} |", flush=True
        )
    if args.json:
        env = environment()
        with open(args.json, "w") as f:
            json.dump(dict(device=device, env=env, args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
