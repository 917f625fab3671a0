"""Training-step time of the arena's small quality models, eager against CUDA-graph replay.

The arena trains small models (d_model 128, 4 layers) on MQAR at batch 512: their steps are bound by
kernel launches, not by the GPU. This measures `effarch.train.train` both ways on the same batches
(MQAR 64 tokens x 4 pairs, vocabulary 8192) and reports milliseconds per step (capture included) and the
mean loss of the last 10 steps, which must agree.
`--breakdown` (CUDA) splits a graphed step's steady state instead: the GPU time of one replay (CUDA events),
the host's batch preparation alone, and the whole step as the training loop runs it (prepare, copy, replay,
read the loss), each a median over `--steps` steps after the capture; once with the head over every position
(ignored ones masked) and once over the graded positions alone, as training captures it.
Usage: python benchmarks/arena_step.py [--archs transformer,gated-deltanet,...] [--steps 100] [--breakdown]
       [--batch 512] [--length 64] [--write]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
from results import append_section, environment

from effarch.arena.archs import default_specs, parse_arch, task_config
from effarch.data.batches import TaskBatches
from effarch.data.tasks import mqar
from effarch.models.lm import CausalLM
from effarch.train import (
    GRAPH_WARMUP_STEPS,
    GraphedStep,
    TrainConfig,
    _device_batch,
    _forward_backward,
    _host_batch,
    make_optimizer,
    train,
)


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


def breakdown(spec: str, batches, args, scored_rows: bool) -> dict:
    """Steady-state parts of a graphed step (see the module docstring); ms, medians over args.steps. With
    `scored_rows` the step builds the head's logits for the graded positions alone, as training does."""
    arch = parse_arch(spec, args.size, args.size)
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = CausalLM(task_config(arch.quality_config, 8192, args.length)).to(device)
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        seq_len=args.length,
        lr=1e-3,
        cuda_graph=True,
        graph_scored_rows=scored_rows,
    )
    optimizer = make_optimizer(model, cfg)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # the loop's eager warm-up steps
        for i in range(GRAPH_WARMUP_STEPS):
            inputs, targets = _device_batch(batches, i, cfg, device)
            _forward_backward(model, inputs, targets, cfg, device)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    torch.cuda.current_stream(device).wait_stream(side)
    inputs, targets = _host_batch(batches, GRAPH_WARMUP_STEPS, cfg, device)
    step = GraphedStep(model, optimizer, cfg, device, inputs, targets)
    replay, prepare, whole = [], [], []
    for _ in range(args.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step.graph.replay()
        end.record()
        end.synchronize()
        replay.append(start.elapsed_time(end))
    for i in range(args.steps):
        t = time.perf_counter()
        _device_batch(batches, i, cfg, device)
        torch.cuda.synchronize(device)
        prepare.append(1e3 * (time.perf_counter() - t))
    for i in range(args.steps):
        t = time.perf_counter()
        inputs, targets = _host_batch(batches, i, cfg, device)
        float(step(inputs, targets, 1e-3))
        whole.append(1e3 * (time.perf_counter() - t))
    step.release()
    return {
        "arch": spec,
        "scored_rows": step.rows,
        "replay_gpu_ms": statistics.median(replay),
        "prepare_ms": statistics.median(prepare),
        "step_ms": statistics.median(whole),
        "tokens_per_step": args.batch * args.length,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default=None, help="comma list (default: the arena's default set)")
    p.add_argument("--size", default="small")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--device", default="cuda")
    p.add_argument("--breakdown", action="store_true", help="split a graphed step's steady state (CUDA)")
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    p.add_argument("--json", help="also write raw figures to this file")
    args = p.parse_args()
    specs = args.archs.split(",") if args.archs else default_specs()
    x, y = mqar(20_000, args.length, args.length // 16, vocab_size=8192, seed=0)
    batches = TaskBatches(x, y)
    if args.breakdown:
        if not torch.cuda.is_available():
            raise SystemExit("arena_step.py --breakdown times CUDA-graph replays: it needs a CUDA GPU")
        lines = [
            "| arch | head rows | replay GPU ms | batch prep ms | whole step ms | tokens/step |",
            "|---|---|---|---|---|---|",
        ]
        rows = []
        for spec in specs:
            for scored in (False, True):
                r = breakdown(spec, batches, args, scored)
                rows.append(r)
                lines.append(
                    f"| {spec} | {r['scored_rows'] or 'all'} | {r['replay_gpu_ms']:.2f} | {r['prepare_ms']:.2f} | "
                    f"{r['step_ms']:.2f} | {r['tokens_per_step']:,} |"
                )
                print(lines[-1], flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"env": environment(), "rows": rows}, f, indent=2)
        if args.write:
            append_section(
                f"Arena graphed step, steady state: {args.size} models, {args.length} x {args.batch}", "\n".join(lines)
            )
        return
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
