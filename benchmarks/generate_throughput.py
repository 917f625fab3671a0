"""Generation speed: effarch presets on their fast path (static caches, decode step replayed as a CUDA graph)
beside transformers' `generate` at the same size.

Measures new tokens/s at batch 1 and 64 for a 512-token prompt and 256 new tokens, greedy (transformers with
use_cache=True and min_new_tokens = max_new_tokens, so both produce the same count), and per-token decode
latency against context length 1K-32K (linear presets should stay flat; attention grows with its KV cache;
contexts whose cache cannot fit are marked, not run). bf16 weights on CUDA. On the CPU (float32, static caches
without graphs) it is a smoke run: `--size debug --device cpu --batches 1,2 --contexts 16,32`.
Usage: python benchmarks/generate_throughput.py [--presets ...] [--size large] [--device auto|cuda|cpu]
       [--batches 1,64] [--contexts 1024,4096,16384,32768] [--also-eager] [--no-fused] [--no-peers]
       [--json FILE] [--write]
"""

from __future__ import annotations

import argparse
import json

import torch
from peers import device_and_dtype, free_cuda_memory, llama_config, parse_ints, peer_size, tokens
from results import append_section, environment

from effarch import build_model
from effarch.benchmarking import measure_decode_latency, measure_generate
from effarch.models.presets import SIZES, preset_config
from effarch.ops import fused

BATCHES = "1,64"
CONTEXTS = "1024,4096,16384,32768"
DECODE_STEPS = 20
PREFILL_TOKENS = 32768  # batch x chunk of one prefill call in the latency runs: bounds the prompt's logits


def _generate_row(label: str, gen, *, batch: int, args, vocab: int, dev: torch.device) -> dict:
    try:
        r = measure_generate(
            gen, batch=batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens, vocab_size=vocab, device=dev
        )
    except torch.OutOfMemoryError:
        r = {"batch": batch, "oom": True}
    if r.get("oom"):  # outside the handler, whose traceback still holds the failed run's tensors
        free_cuda_memory(dev)
    print(f"{label:<52} batch {batch:<3} {_tok_s(r)}", flush=True)
    return {"model": label, **r}


def _tok_s(r: dict) -> str:
    return "OOM" if r.get("oom") else f"{r['tokens_per_s']:,.0f} tok/s"


def _fits(model, batch: int, context: int, dtype: torch.dtype, dev: torch.device) -> bool:
    """Whether the caches at `context` take at most 80% of the free CUDA memory (always on the CPU): a graph
    capture that runs out of memory half-way can leave the device unusable, so such runs are not started."""
    if dev.type != "cuda":
        return True
    free_cuda_memory(dev)  # blocks the allocator still caches (an earlier run's caches) count as free
    need = sum(model.cache_nbytes(context + DECODE_STEPS + 4, batch, dtype))
    return need <= 0.8 * torch.cuda.mem_get_info(dev)[0]


def _latency_row(name: str, model, *, batch: int, context: int, vocab: int, dtype, dev) -> dict:
    row = {"model": name, "batch": batch, "context": context}
    if not _fits(model, batch, context, dtype, dev):
        row["oom"] = True
        row["skipped"] = "cache larger than free memory"
    else:
        try:
            row.update(
                measure_decode_latency(
                    model,
                    batch=batch,
                    context=context,
                    vocab_size=vocab,
                    device=dev,
                    cuda_graph=dev.type == "cuda",
                    static_cache=True,
                    prefill_chunk=max(1, PREFILL_TOKENS // batch),
                    steps=DECODE_STEPS,
                )
            )
        except torch.OutOfMemoryError:
            row["oom"] = True
        if row.get("oom"):  # outside the handler, whose traceback still holds the failed run's tensors
            free_cuda_memory(dev)
    print(f"{name:<30} context {tokens(context):>6} batch {batch:<3} {_ms(row)}", flush=True)
    return row


def _ms(r: dict) -> str:
    return "OOM" if r.get("oom") else f"{r['ms']:.3f} ms"


def _hf_rows(args, batches: list[int], dev: torch.device, dtype: torch.dtype) -> list[dict]:
    """transformers' Llama generate (greedy, KV cache) at the effarch size; [] with a note when unavailable."""
    try:
        from transformers import LlamaForCausalLM

        cfg = llama_config(args.size, max_positions=args.prompt_len + args.new_tokens)
    except Exception as e:  # noqa: BLE001 - a missing peer is a note, not a failed run
        print(f"transformers unavailable: {e}")
        return []
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg).to(dev, dtype).eval()

    def gen(prompt, n):
        return hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            use_cache=True,
            pad_token_id=cfg.pad_token_id,
        )

    try:
        return [
            _generate_row("transformers Llama generate", gen, batch=b, args=args, vocab=cfg.vocab_size, dev=dev)
            for b in batches
        ]
    except Exception as e:  # noqa: BLE001 - report, do not lose the effarch figures
        print(f"transformers peer failed: {type(e).__name__}: {e}")
        return []


def tables(rows: list[dict], lat: list[dict], batches: list[int], contexts: list[int], args, fast: str) -> str:
    t1 = ["| model | " + " | ".join(f"batch {b} tok/s" for b in batches) + " |", "|---|" + "---|" * len(batches)]
    for m in dict.fromkeys(r["model"] for r in rows):
        cells = []
        for b in batches:
            r = next(x for x in rows if x["model"] == m and x["batch"] == b)
            cells.append("OOM" if r.get("oom") else f"{r['tokens_per_s']:,.0f}")
        t1.append(f"| {m} | " + " | ".join(cells) + " |")
    t2 = [
        "| preset | batch | " + " | ".join(f"{tokens(c)} ms" for c in contexts) + " |",
        "|---|---|" + "---|" * len(contexts),
    ]
    for m in dict.fromkeys(r["model"] for r in lat):
        for b in batches:
            cells = []
            for c in contexts:
                r = next(x for x in lat if x["model"] == m and x["batch"] == b and x["context"] == c)
                cells.append("OOM" if r.get("oom") else f"{r['ms']:.3f}")
            t2.append(f"| {m} | {b} | " + " | ".join(cells) + " |")
    return (
        f"Prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy; effarch with {fast}:\n\n"
        + "\n".join(t1)
        + f"\n\nPer-token decode latency ({fast}) against context:\n\n"
        + "\n".join(t2)
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="transformer,gla,gated-deltanet,mamba2,hybrid-gdn")
    p.add_argument("--size", default="large", choices=list(SIZES))
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batches", default=BATCHES, help="batch sizes (default %(default)s)")
    p.add_argument("--contexts", default=CONTEXTS, help="contexts of the latency runs (default %(default)s)")
    p.add_argument("--also-eager", action="store_true", help="also time effarch's plain decoding loop")
    p.add_argument("--no-fused", action="store_true", help="effarch on its PyTorch path, not the fused kernels")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--write", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    p.add_argument("--json", help="also write raw figures to this file")
    args = p.parse_args()
    batches, contexts = parse_ints(args.batches, "batches"), parse_ints(args.contexts, "contexts")
    if args.prompt_len < 1 or args.new_tokens < 1:
        raise SystemExit(f"--prompt-len {args.prompt_len} and --new-tokens {args.new_tokens} must be positive")
    dev, dtype = device_and_dtype(args.device)
    if args.no_fused:
        fused.use_fused(False)
    graph = dev.type == "cuda"
    fast = "static cache + CUDA graph" if graph else "static cache"
    rows, lat = [], []
    for name in args.presets.split(","):
        try:
            cfg = preset_config(f"{name}:{args.size}")
        except (KeyError, ValueError) as e:
            print(f"skip {name}: {e}")
            continue
        torch.manual_seed(0)
        model = build_model(cfg).to(dev, dtype).eval()
        ways = [(f"effarch {name} ({fast})", dict(static_cache=True, cuda_graph=graph))]
        if args.also_eager:
            ways.append((f"effarch {name} (eager)", {}))
        for label, options in ways:
            for b in batches:

                def gen(prompt, n, model=model, options=options):
                    return model.generate(prompt, n, temperature=0, **options)

                rows.append(_generate_row(label, gen, batch=b, args=args, vocab=cfg.vocab_size, dev=dev))
        for ctx in contexts:
            for b in batches:
                lat.append(_latency_row(name, model, batch=b, context=ctx, vocab=cfg.vocab_size, dtype=dtype, dev=dev))
        del model
        free_cuda_memory(dev)
    if not args.no_peers:
        rows += _hf_rows(args, batches, dev, dtype)
        free_cuda_memory(dev)
    body = tables(rows, lat, batches, contexts, args, fast)
    print(body)
    if args.json:
        out = {"env": environment(), "device": dev.type, "size": args.size, "generate": rows, "decode": lat}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    if args.write:
        s = peer_size(args.size)
        append_section(
            f"Generation throughput, {args.size} size (d {s['d_model']}, {s['n_layers']} layers), "
            f"{str(dtype).removeprefix('torch.')} weights",
            body,
        )


if __name__ == "__main__":
    main()
