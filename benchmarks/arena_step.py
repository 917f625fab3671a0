"""Training-step time of the arena's small quality models, eager against CUDA-graph replay.

The arena trains small models (d_model 128, 4 layers) on MQAR at batch 512: their steps are bound by
kernel launches, not by the GPU. This measures `effarch.train.train` both ways on the same batches
(MQAR 64 tokens x 4 pairs, vocabulary 8192) and reports milliseconds per step (capture included) and the
mean loss of the last 10 steps, which must agree.
Usage: python benchmarks/arena_step.py [--archs transformer,gated-deltanet,...] [--steps 100] [--write]
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch
from results import append_section, environment

from effarch.arena.archs import default_specs, parse_arch, task_config
from effarch.data.batches import TaskBatches
from effarch.data.tasks import mqar
from effarch.models.lm import CausalLM
from effarch.train import TrainConfig, train


def run(spec: str, batches, args, graph: bool) -> dict:
    arch = parse_arch(spec, args.size, args.size)
    torch.manual_seed(0)
    model = CausalLM(task_config(arch.quality_config, 8192, args.length))
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        seq_len=args.length,
        lr=1e-3,
        warmup_steps=10,
        device=args.device,
        progress=False,
        cuda_graph=graph,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(model, batches, cfg)
    return {
        "arch": spec,
        "cuda_graph": graph,
        "ms_per_step": 1e3 * result.elapsed_s / result.steps,
        "last_loss": sum(result.losses[-10:]) / len(result.losses[-10:]),
        "fell_back": [str(w.message) for w in caught if "CUDA-graph" in str(w.message)],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default=None, help="comma list (default: the arena's default set)")
    p.add_argument("--size", default="small")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--device", default="cuda")
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    p.add_argument("--json", help="also write raw figures to this file")
    args = p.parse_args()
    specs = args.archs.split(",") if args.archs else default_specs()
    x, y = mqar(20_000, args.length, args.length // 16, vocab_size=8192, seed=0)
    batches = TaskBatches(x, y)
    rows = []
    lines = ["| arch | eager ms/step | graph ms/step | speed-up | loss eager / graph |", "|---|---|---|---|---|"]
    for spec in specs:
        eager, graphed = run(spec, batches, args, False), run(spec, batches, args, True)
        rows += [eager, graphed]
        note = " (fell back to eager)" if graphed["fell_back"] else ""
        lines.append(
            f"| {spec} | {eager['ms_per_step']:.1f} | {graphed['ms_per_step']:.1f}{note} | "
            f"{eager['ms_per_step'] / graphed['ms_per_step']:.1f}x | "
            f"{eager['last_loss']:.3f} / {graphed['last_loss']:.3f} |"
        )
        print(lines[-1], flush=True)
    body = "\n".join(lines)
    print(body)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": environment(), "rows": rows}, f, indent=2)
    if args.write:
        append_section(
            f"Arena training step, {args.size} models, MQAR {args.length} tokens x batch {args.batch}, "
            f"{args.steps} steps (bf16 autocast, fused AdamW)",
            body,
        )


if __name__ == "__main__":
    main()
