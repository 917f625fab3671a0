"""Generation speed: effarch presets (CUDA-graph decode over static caches) beside transformers' generate.

Measures new tokens/s at batch 1 and 64 for a 512-token prompt and 256 new tokens, and per-token decode
latency against context length (linear presets should stay flat; attention grows with the KV cache).
Usage: python benchmarks/generate_throughput.py [--presets ...] [--size large] [--write]
"""

from __future__ import annotations

import argparse
import json

import torch
from results import append_section, environment

from effarch import build_model
from effarch.benchmarking import measure_decode_latency, measure_generate
from effarch.models.presets import preset_config

BATCHES = (1, 64)
CONTEXTS = (1024, 4096, 16384, 32768)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--presets", default="transformer,gla,gated-deltanet,mamba2,hybrid-gdn")
    p.add_argument("--size", default="large")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--write", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("generate_throughput.py measures GPU decoding; no CUDA device is available")
    dev = torch.device("cuda")
    rows, lat = [], []
    for name in args.presets.split(","):
        try:
            cfg = preset_config(f"{name}:{args.size}")
        except (KeyError, ValueError) as e:
            print(f"skip {name}: {e}")
            continue
        torch.manual_seed(0)
        model = build_model(cfg).to(dev, torch.bfloat16).eval()
        for graph in (False, True):
            label = f"effarch {name}" + (" (CUDA graph)" if graph else " (eager)")
            for b in BATCHES:

                def gen(prompt, n, model=model, graph=graph):
                    return model.generate(prompt, n, temperature=0, cuda_graph=graph)

                try:
                    r = measure_generate(
                        gen,
                        batch=b,
                        prompt_len=args.prompt_len,
                        new_tokens=args.new_tokens,
                        vocab_size=cfg.vocab_size,
                        device=dev,
                    )
                except torch.OutOfMemoryError:
                    r = {"batch": b, "oom": True}
                    torch.cuda.empty_cache()
                rows.append({"model": label, **r})
                print(label, b, r.get("tokens_per_s"), flush=True)
        for ctx in CONTEXTS:
            for b in BATCHES:
                try:
                    r = measure_decode_latency(
                        model, batch=b, context=ctx, vocab_size=cfg.vocab_size, device=dev, cuda_graph=True
                    )
                except torch.OutOfMemoryError:
                    r = {"batch": b, "context": ctx, "oom": True}
                    torch.cuda.empty_cache()
                lat.append({"model": name, **r})
                print(name, ctx, b, r.get("ms"), flush=True)
        del model
        torch.cuda.empty_cache()
    if not args.no_peers:
        try:
            from transformers import LlamaConfig, LlamaForCausalLM

            cfg = LlamaConfig(
                hidden_size=1024,
                intermediate_size=2816,
                num_hidden_layers=24,
                num_attention_heads=8,
                num_key_value_heads=8,
                vocab_size=32000,
                tie_word_embeddings=True,
                attn_implementation="sdpa",
            )
            torch.manual_seed(0)
            hf = LlamaForCausalLM(cfg).to(dev, torch.bfloat16).eval()
            for b in BATCHES:

                def gen(prompt, n):
                    return hf.generate(
                        prompt,
                        max_new_tokens=n,
                        min_new_tokens=n,
                        do_sample=False,
                        attention_mask=torch.ones_like(prompt),
                        pad_token_id=0,
                    )

                r = measure_generate(
                    gen, batch=b, prompt_len=args.prompt_len, new_tokens=args.new_tokens, vocab_size=32000, device=dev
                )
                rows.append({"model": "transformers Llama generate", **r})
                print("hf", b, r["tokens_per_s"], flush=True)
            del hf
        except Exception as e:  # noqa: BLE001 - report, do not crash the whole run
            print(f"transformers peer failed: {e}")
    t1 = ["| model | " + " | ".join(f"batch {b} tok/s" for b in BATCHES) + " |", "|---|" + "---|" * len(BATCHES)]
    for m in dict.fromkeys(r["model"] for r in rows):
        cells = [
            next(
                (f"{x['tokens_per_s']:,.0f}" if not x.get("oom") else "OOM")
                for x in rows
                if x["model"] == m and x["batch"] == b
            )
            for b in BATCHES
        ]
        t1.append(f"| {m} | " + " | ".join(cells) + " |")
    t2 = [
        "| preset | batch | " + " | ".join(f"{c // 1024}K ms" for c in CONTEXTS) + " |",
        "|---|---|" + "---|" * len(CONTEXTS),
    ]
    for m in dict.fromkeys(r["model"] for r in lat):
        for b in BATCHES:
            cells = [
                next(
                    (f"{x['ms']:.3f}" if not x.get("oom") else "OOM")
                    for x in lat
                    if x["model"] == m and x["batch"] == b and x["context"] == c
                )
                for c in CONTEXTS
            ]
            t2.append(f"| {m} | {b} | " + " | ".join(cells) + " |")
    body = (
        f"Prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, bf16:\n\n"
        + "\n".join(t1)
        + "\n\nPer-token decode latency (CUDA graph) against context:\n\n"
        + "\n".join(t2)
    )
    print(body)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": environment(), "generate": rows, "decode": lat}, f, indent=2)
    if args.write:
        append_section(f"Generation throughput, {args.size} size", body)


if __name__ == "__main__":
    main()
