"""The language-model head's loss: chunked linear cross-entropy with the Triton row pass, its PyTorch form, and the
full-logits cross-entropy (what a plain model runs), forward+backward in one run.

For hidden states [N, d] and a head [vocab, d] (bf16), times loss + both gradients (median of CUDA-event timings)
and reports the peak memory above the inputs and the largest relative difference of loss and gradients from the
float32 full-logits reference. On the CPU it is a smoke run of every path (the kernel under TRITON_INTERPRET=1)
at a small shape.
Usage: python benchmarks/ce_ops.py [--shapes 32768x1024x32000] [--chunk 4096] [--device cuda|cpu] [--json PATH]
       [--write]
"""

from __future__ import annotations

import argparse

import torch
from conv_ops import median_ms, rel
from results import measure_and_report, parse_shapes, pick_device

from effarch.ops.cross_entropy import linear_cross_entropy

FORMS = {"full logits (F.cross_entropy)": "reference", "chunked, PyTorch": "torch", "chunked, Triton rows": "triton"}


def measure(N: int, d: int, vocab: int, chunk: int, device: torch.device) -> list[dict]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(N, d, generator=g).to(device, dtype)
    w = (torch.randn(vocab, d, generator=g) / d**0.5).to(device, dtype)
    y = torch.randint(0, vocab, (N,), generator=g).to(device)
    hr, wr = h.float().requires_grad_(), w.float().requires_grad_()
    lr = linear_cross_entropy(hr, wr, y, backend="reference")
    truth = [lr, *torch.autograd.grad(lr, (hr, wr))]
    del hr, wr, lr
    rows = []
    for name, backend in FORMS.items():
        leaves = (h.clone().requires_grad_(), w.clone().requires_grad_())

        def step(leaves=leaves, backend=backend):
            loss = linear_cross_entropy(*leaves, y, backend=backend, chunk_size=chunk)
            return [loss, *torch.autograd.grad(loss, leaves)]

        err = max(rel(o, r) for o, r in zip(step(), truth, strict=True))
        peak = 0.0
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        ms = median_ms(step, device)
        rows.append({"N": N, "d": d, "vocab": vocab, "chunk": chunk, "form": name, "fwdbwd_ms": ms, "peak_gib": peak,
                     "max_rel_err": err})  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| N x d x vocab | form | fwd+bwd ms | peak GiB above inputs | max rel. diff |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['N']} x {r['d']} x {r['vocab']} | {r['form']} | {r['fwdbwd_ms']:.3f} | {r['peak_gib']:.2f} "
            f"| {r['max_rel_err']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="32768x1024x32000,8192x2048x128256")
    p.add_argument("--chunk", type=int, default=4096, help="tokens per chunk of the chunked forms")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    p.add_argument("--json", default=None)
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = p.parse_args()
    if args.chunk < 1:
        p.error(f"--chunk {args.chunk}: give a positive number of tokens")
    device = pick_device(args.device)
    shapes = parse_shapes(args.shapes, fields="TOKENSxDIMxVOCAB", example="32768x1024x32000")
    measure_and_report(
        shapes, lambda N, d, vocab: measure(N, d, vocab, args.chunk, device), table, args, device,
        "Language-model head loss: chunked Triton rows against PyTorch and full logits",
    )  # fmt: skip


if __name__ == "__main__":
    main()
