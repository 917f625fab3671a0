"""Training throughput of effarch presets beside transformers' Llama and fla's GLA of the same size.

On CUDA one run measures everyone at T = 2K x 16, 8K x 4, 32K x 1: tokens/s (median step of forward, backward
and AdamW) and peak memory, with bf16 weights and fused AdamW for every model. The ~341M comparison size
("large"): d_model 1024, 24 layers, FFN 2816, vocab 32000; the peers are built at the same size. effarch runs
its fused Triton kernels (RMSNorm + residual, SwiGLU, rotary) unless --no-fused. On the CPU (float32, plain
AdamW) it is a smoke run: `--size debug --device cpu --shapes 2x64 --steps 1`. fla tunes its kernels on their
first calls (minutes on an H200); with Triton's cache kept (TRITON_CACHE_DIR) a later run reuses what it found,
so `--presets "" --peers fla-gla` once fills the cache for a comparison run. --cuda-graph captures every model's
step (AdamW included) once and replays it: a step of thousands of small launches then runs at the GPU's pace
rather than the host's, and run-to-run spread shrinks; a model that cannot be captured is left out with a note.
Usage: python benchmarks/train_throughput.py [--presets transformer,gla,...] [--size large]
       [--shapes 16x2048,4x8192,1x32768] [--device auto|cuda|cpu] [--compile] [--cuda-graph] [--no-fused]
       [--separate-projections] [--set effarch.MODULE.NAME=VALUE] [--peers llama,fla-gla|none] [--no-peers]
       [--json FILE] [--write]
"""

from __future__ import annotations

import argparse
import json

import torch
from peers import TRAIN_PEERS, device_and_dtype, free_cuda_memory, peer_size, tokens, train_peers
from results import append_section, apply_settings, environment, parse_shapes

from effarch import build_model
from effarch.benchmarking import measure_train_step, phase_summary
from effarch.compile import compile_model
from effarch.layers import projections
from effarch.models.presets import SIZES, preset_config
from effarch.ops import fused

SHAPES = "16x2048,4x8192,1x32768"


def effarch_loss(model, ids):
    return model(ids, targets=ids.roll(-1, 1), return_logits=False).loss


def hf_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _cell(r: dict) -> str:
    if r.get("oom"):
        return "OOM"
    mem = "" if r["peak_mem_bytes"] is None else f" ({r['peak_mem_bytes'] / 2**30:.1f})"
    return f"{r['tokens_per_s'] / 1e3:.1f}{mem}"


def table(rows: list[dict], shapes: list[tuple[int, int]], notes: list[str]) -> str:
    lines = [
        "| model | params | " + " | ".join(f"{tokens(t)} x {b} ktok/s (GiB)" for b, t in shapes) + " |",
        "|---|---|" + "---|" * len(shapes),
    ]
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [x for x in rows if x["model"] == name]
        cells = [_cell(next(x for x in mine if (x["batch"], x["seq_len"]) == shape)) for shape in shapes]
        lines.append(f"| {name} | {mine[0]['params'] / 1e6:.1f}M | " + " | ".join(cells) + " |")
    return "\n".join(lines + [f"- {n}" for n in notes])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="transformer,gla,gated-deltanet,mamba2,hybrid-gdn")
    p.add_argument("--size", default="large", choices=list(SIZES))
    p.add_argument("--shapes", default=SHAPES, help="BATCHxLENGTH,... (default %(default)s)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile effarch blocks")
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="every model's training step captured once and replayed (the host's launches out of the timing)",
    )
    p.add_argument("--steps", type=int, default=8, help="timed steps per shape (median)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--no-fused", action="store_true", help="effarch on its PyTorch path, not the fused kernels")
    p.add_argument(
        "--separate-projections",
        action="store_true",
        help="mixers' projections of one input as separate layers, not one autograd node (effarch.layers.projections)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="effarch.MODULE.NAME=VALUE",
        help="set a launch or layer setting for this run (repeatable), e.g. effarch.ops.fused.norm.FWD_TILE=4096",
    )
    p.add_argument("--no-peers", action="store_true", help="no peer models (same as --peers none)")
    p.add_argument(
        "--peers", default=",".join(TRAIN_PEERS), help=f"peers to run: some of {', '.join(TRAIN_PEERS)}, or none"
    )
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    p.add_argument("--json", help="also write raw figures to this file")
    args = p.parse_args()
    shapes = parse_shapes(args.shapes)
    peers = () if args.no_peers or args.peers == "none" else tuple(x.strip() for x in args.peers.split(",") if x)
    if set(peers) - set(TRAIN_PEERS):
        raise SystemExit(f"--peers {args.peers!r}: expected some of {', '.join(TRAIN_PEERS)} (comma-separated) or none")
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit(f"--steps {args.steps} must be >= 1 and --warmup {args.warmup} >= 0")
    dev, dtype = device_and_dtype(args.device)
    if args.cuda_graph and dev.type != "cuda":
        raise SystemExit(f"--cuda-graph needs a CUDA device; this run is on {dev.type}")
    if args.no_fused:
        fused.use_fused(False)
    if args.separate_projections:
        projections.SHARED_PROJECTIONS = False
    settings = apply_settings(args.set)
    kernels = fused.enabled(dev, dtype)
    candidates = []  # (name, builder, loss, vocabulary, fused kernels)
    for name in (n.strip() for n in args.presets.split(",") if n.strip()):  # --presets "": peers alone
        try:
            cfg = preset_config(f"{name}:{args.size}")
        except (KeyError, ValueError) as e:
            print(f"skip {name}: {e}")
            continue
        label = f"effarch {name}" + (" (compiled)" if args.compile else "") + (" (unfused)" if args.no_fused else "")
        label += " (separate projections)" if args.separate_projections else ""
        label += " (CUDA graph)" if args.cuda_graph else ""
        label += "".join(f" [{x}]" for x in settings)
        build = lambda cfg=cfg: compile_model(build_model(cfg)) if args.compile else build_model(cfg)
        candidates.append((label, build, effarch_loss, cfg.vocab_size, kernels))
    notes = []
    if peers:
        found, notes = train_peers(args.size, peers)
        graphed = " (CUDA graph)" if args.cuda_graph else ""
        candidates += [(n + graphed, b, hf_loss, peer_size(args.size)["vocab"], None) for n, b in found]
    rows = []
    for name, builder, loss_of, vocab, kernels in candidates:
        torch.manual_seed(0)
        try:
            model = builder().to(dev, dtype).train()
            n_params = sum(p.numel() for p in model.parameters())
            for batch, seq in shapes:
                r = measure_train_step(
                    model,
                    loss_of,
                    batch=batch,
                    seq_len=seq,
                    vocab_size=vocab,
                    steps=args.steps,
                    warmup=args.warmup,
                    cuda_graph=args.cuda_graph,
                )
                r.update(model=name, params=n_params, dtype=str(dtype).removeprefix("torch."), fused=kernels)
                rows.append(r)
                issue = (
                    "" if r.get("oom") else f", host issues the step in {r['issue_ms']:.0f} of {r['step_ms']:.0f} ms"
                )
                phases = f"; {phase_summary(r['phases'])}" if r.get("phases") else ""
                print(f"{name:<40} {tokens(seq):>6} x {batch:<3} {_cell(r)}{issue}{phases}", flush=True)
        except Exception as e:
            if loss_of is effarch_loss:
                raise
            # A peer that fails here (fla's kernels on the CPU, say) is a note, not a failed run.
            rows = [r for r in rows if r["model"] != name]
            notes.append(f"{name} failed: {type(e).__name__}: {e}")
            print(notes[-1], flush=True)
        model = None
        free_cuda_memory(dev)
    body = table(rows, shapes, notes)
    print(body)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": environment(), "device": dev.type, "size": args.size, "rows": rows}, f, indent=2)
    if args.write:
        s = peer_size(args.size)
        append_section(
            f"Training throughput, {args.size} size (d {s['d_model']}, {s['n_layers']} layers, FFN {s['ffn']}, "
            f"vocab {s['vocab']}), {str(dtype).removeprefix('torch.')} weights, "
            f"{'fused ' if dev.type == 'cuda' else ''}AdamW, median of {args.steps} steps",
            body,
        )


if __name__ == "__main__":
    main()
