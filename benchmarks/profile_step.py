"""Where a training step's time and memory go: one preset, one shape, torch.profiler over a few steps.

Prints the kernels (CUDA) or operators (CPU) that take the most device time, grouped by name, with their share
of the step, and the peak memory with and without the backward's saved activations, so the next optimisation
goes where the time is. bf16 weights and fused AdamW on CUDA, as in train_throughput.py.
Usage: python benchmarks/profile_step.py --preset mamba2 [--size large] [--batch 4] [--seq-len 8192]
       [--steps 3] [--top 25] [--device cuda|cpu] [--json PATH]
"""

from __future__ import annotations

import argparse
import json

import torch
from peers import device_and_dtype
from results import environment
from torch.profiler import ProfilerActivity, profile

from effarch import build_model
from effarch.models.presets import SIZES, preset_config


def step_fn(model, optimizer, ids):
    def step():
        loss = model(ids, targets=ids.roll(-1, 1), return_logits=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", required=True)
    ap.add_argument("--size", default="large", choices=list(SIZES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps (after 2 warm-up steps)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if min(args.batch, args.seq_len, args.steps, args.top) < 1:
        raise SystemExit("--batch, --seq-len, --steps and --top must be positive")
    dev, dtype = device_and_dtype(args.device)
    try:
        config = preset_config(f"{args.preset}:{args.size}")
    except (KeyError, ValueError) as e:
        raise SystemExit(str(e)) from None
    torch.manual_seed(0)
    model = build_model(config).to(dev, dtype).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda" or None)
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=dev)
    step = step_fn(model, optimizer, ids)
    for _ in range(2):
        step()
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    key = "device_time_total" if cuda else "self_cpu_time_total"
    rows = [e for e in events if getattr(e, key, 0) > 0 and (cuda or e.key.startswith("aten::"))]
    if cuda:  # kernels only: operator rows would count the same time again
        rows = [e for e in rows if getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type)]
    total = sum(getattr(e, key) for e in rows) or 1.0
    rows.sort(key=lambda e: -getattr(e, key))
    report = []
    print(f"{args.preset}:{args.size} batch {args.batch} x {args.seq_len}, {args.steps} steps, {dev.type}")
    print(f"{'share':>6} {'ms/step':>9} {'calls/step':>10}  name")
    for e in rows[: args.top]:
        ms = getattr(e, key) / 1e3 / args.steps
        share = getattr(e, key) / total
        calls = e.count / args.steps
        report.append({"name": e.key, "ms_per_step": ms, "share": share, "calls_per_step": calls})
        print(f"{share:6.1%} {ms:9.3f} {calls:10.1f}  {e.key[:110]}")
    peak = torch.cuda.max_memory_allocated() if cuda else None
    summary = {"step_ms": total / 1e3 / args.steps, "peak_mem_bytes": peak}
    print(f"device time per step {summary['step_ms']:.2f} ms" + (f", peak {peak / 2**30:.1f} GiB" if peak else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": environment(), "args": vars(args), "summary": summary, "top": report}, f, indent=1)


if __name__ == "__main__":
    main()
