"""Training throughput of effarch presets beside transformers' Llama and fla's models of the same size.

One run measures everyone at T = 2K x 16, 8K x 4, 32K x 1 (tokens/s and peak memory; bf16 weights,
fused AdamW). The ~341M comparison size: d_model 1024, 24 layers, FFN 2816, vocab 32000.
Usage: python benchmarks/train_throughput.py [--presets transformer,gla,...] [--compile] [--write]
"""

from __future__ import annotations

import argparse
import json

import torch
from results import append_section, environment

from effarch import build_model
from effarch.benchmarking import measure_train_step
from effarch.compile import compile_model
from effarch.models.presets import preset_config

SHAPES = [(16, 2048), (4, 8192), (1, 32768)]
D, LAYERS, FFN, VOCAB, HEADS = 1024, 24, 2816, 32000, 8


def effarch_loss(model, ids):
    return model(ids, targets=ids.roll(-1, 1), return_logits=False).loss


def hf_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def peers():
    """(name, builder) of peer models; missing libraries are skipped with a note."""
    out, notes = [], []
    try:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            hidden_size=D,
            intermediate_size=FFN,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=HEADS,
            vocab_size=VOCAB,
            max_position_embeddings=32768,
            tie_word_embeddings=True,
            attn_implementation="sdpa",
        )
        out.append(("transformers Llama (SDPA)", lambda: LlamaForCausalLM(cfg)))
    except Exception as e:  # noqa: BLE001 - a peer that cannot load is reported, not fatal
        notes.append(f"transformers unavailable: {e}")
    try:
        from fla.models import GLAConfig, GLAForCausalLM

        gcfg = GLAConfig(
            hidden_size=D,
            intermediate_size=FFN,
            num_hidden_layers=LAYERS,
            num_heads=4,
            vocab_size=VOCAB,
            tie_word_embeddings=True,
            fuse_cross_entropy=True,
        )
        out.append(("fla GLA", lambda: GLAForCausalLM(gcfg)))
    except Exception as e:  # noqa: BLE001
        notes.append(f"fla unavailable: {e}")
    return out, notes


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--presets", default="transformer,gla,gated-deltanet,mamba2,hybrid-gdn")
    p.add_argument("--size", default="large")
    p.add_argument("--compile", action="store_true", help="torch.compile effarch blocks")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    p.add_argument("--json", help="also write raw figures to this file")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("train_throughput.py measures GPU training; no CUDA device is available")
    dev = torch.device("cuda")
    candidates = []
    for name in args.presets.split(","):
        try:
            cfg = preset_config(f"{name}:{args.size}")
        except (KeyError, ValueError) as e:
            print(f"skip {name}: {e}")
            continue
        candidates.append(
            (
                f"effarch {name}" + (" (compiled)" if args.compile else ""),
                lambda cfg=cfg: compile_model(build_model(cfg)) if args.compile else build_model(cfg),
                effarch_loss,
            )
        )
    notes = []
    if not args.no_peers:
        found, notes = peers()
        candidates += [(n, b, hf_loss) for n, b in found]
    rows = []
    for name, builder, loss_of in candidates:
        torch.manual_seed(0)
        model = builder().to(dev, torch.bfloat16).train()
        n_params = sum(p.numel() for p in model.parameters())
        for batch, seq in SHAPES:
            r = measure_train_step(model, loss_of, batch=batch, seq_len=seq, vocab_size=VOCAB, steps=args.steps)
            r.update(model=name, params=n_params)
            rows.append(r)
            shown = (
                "OOM"
                if r.get("oom")
                else f"{r['tokens_per_s'] / 1e3:8.1f} ktok/s  {r['peak_mem_bytes'] / 2**30:6.1f} GiB"
            )
            print(f"{name:<34} {seq:>6} x {batch:<3} {shown}", flush=True)
        del model
        torch.cuda.empty_cache()
    lines = [
        "| model | params | " + " | ".join(f"{s // 1024}K x {b} ktok/s (GiB)" for b, s in SHAPES) + " |",
        "|---|---|" + "---|" * len(SHAPES),
    ]
    for name in dict.fromkeys(r["model"] for r in rows):
        cells = []
        for _, s in SHAPES:
            r = next(x for x in rows if x["model"] == name and x["seq_len"] == s)
            cells.append(
                "OOM" if r.get("oom") else f"{r['tokens_per_s'] / 1e3:.1f} ({r['peak_mem_bytes'] / 2**30:.1f})"
            )
        params = next(x["params"] for x in rows if x["model"] == name)
        lines.append(f"| {name} | {params / 1e6:.0f}M | " + " | ".join(cells) + " |")
    table = "\n".join(lines + [f"- {n}" for n in notes])
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": environment(), "rows": rows}, f, indent=2)
    if args.write:
        append_section(
            f"Training throughput, {args.size} size (d {D}, {LAYERS} layers, FFN {FFN}, vocab {VOCAB}), "
            "bf16 weights, fused AdamW, median of steps",
            table,
        )


if __name__ == "__main__":
    main()
