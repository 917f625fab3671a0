"""The `effarch` command: list, info, train, generate, arena, bench.

User mistakes print one sentence on stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


class UsageError(ValueError):
    """A mistake in what the user asked for."""


def _load_config(spec: str):
    from effarch.models.presets import resolve_config

    return resolve_config(spec)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


# ---- list / info ----------------------------------------------------------------------------------
def cmd_list(args) -> int:
    from effarch import registry

    rows: dict[str, list[tuple[str, str, str]]] = {}
    for kind in ("mixer", "ffn", "preset"):
        for name, e in registry.entries(kind).items():
            rows.setdefault(e.family, []).append((kind, name, e.paper))
    if args.json:
        print(
            json.dumps(
                {fam: [dict(kind=k, name=n, paper=p) for k, n, p in r] for fam, r in sorted(rows.items())}, indent=2
            )
        )
        return 0
    for fam in sorted(rows):
        print(f"{fam}  ({registry.FAMILIES[fam]})")
        for kind, name, paper in sorted(rows[fam]):
            print(f"  {kind:<7} {name:<22} {paper}")
    return 0


def cmd_info(args) -> int:
    import torch

    from effarch.models.lm import CausalLM

    config = _load_config(args.config)
    with torch.device("meta"):
        model = CausalLM(config)
    n = model.num_parameters()
    n_emb = model.embed.weight.numel()
    print(f"model      {config.name or args.config}")
    print(f"layers     {config.n_layers} ({config.layers}), d_model {config.d_model}, vocab {config.vocab_size}")
    print(f"parameters {n:,} ({n - n_emb:,} without embeddings)")
    dtype = torch.bfloat16
    per_tok = [
        model.cache_nbytes(1025, 1, dtype)[i] - model.cache_nbytes(1024, 1, dtype)[i] for i in range(config.n_layers)
    ]
    print(f"cache      {_fmt_bytes(sum(per_tok))} per token (bf16, growing layers), per layer:")
    for i, block in enumerate(model.blocks):
        fixed = model.cache_nbytes(1, 1, dtype)[i] - per_tok[i]
        print(f"  {i:>3} {block.mixer_name:<14} {_fmt_bytes(per_tok[i]):>12}/token  + {_fmt_bytes(fixed):>12} fixed")
    for ctx in (1024, 8192, 32768, 131072):
        print(f"cache at {ctx:>6} tokens, batch 1: {_fmt_bytes(sum(model.cache_nbytes(ctx, 1, dtype)))}")
    return 0


# ---- train / generate -----------------------------------------------------------------------------
def cmd_train(args) -> int:
    from effarch.data.batches import StreamBatches
    from effarch.data.corpus import load_corpus
    from effarch.models.lm import CausalLM
    from effarch.train import TrainConfig, latest_checkpoint, load_model, train, write_metrics

    out = Path(args.out)
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup_steps=args.warmup if args.warmup is not None else max(1, args.steps // 20),
        grad_accum=args.grad_accum,
        grad_clip=args.grad_clip,
        weight_decay=args.weight_decay,
        eval_every=args.eval_every,
        eval_batches=args.eval_batches,
        seed=args.seed,
        device=args.device,
        dtype=args.dtype,
        checkpoint_dir=str(out),
        checkpoint_every=args.checkpoint_every,
        progress=not args.quiet,
        cuda_graph=args.cuda_graph,
    )
    if args.fresh and out.exists():
        import shutil

        shutil.rmtree(out)
    resuming = latest_checkpoint(out) is not None
    if resuming:
        model = load_model(out)
        print(f"resuming from {latest_checkpoint(out)}", file=sys.stderr)
    else:
        if args.model is None:
            raise UsageError("train needs --model (a preset such as transformer:small, or a config JSON file)")
        import torch

        torch.manual_seed(args.seed)  # the initial weights are part of the run's seed
        model = CausalLM(_load_config(args.model))
    corpus = load_corpus(args.data, max_bytes=args.max_bytes)
    if model.config.vocab_size < 260:
        raise UsageError(f"the model's vocab_size {model.config.vocab_size} is smaller than the byte tokenizer's 260")
    result = train(model, StreamBatches(corpus.train, cfg.seq_len), cfg, StreamBatches(corpus.val, cfg.seq_len))
    write_metrics(out / "metrics.json", result, {"data": corpus.source, "model": model.config.name})
    print(
        f"steps {result.steps}  final loss {result.losses[-1]:.4f}  val bpb {result.val_bpb:.4f}  "
        f"{result.tokens_per_s:,.0f} tokens/s  -> {out}"
    )
    return 0


def cmd_generate(args) -> int:
    import torch

    from effarch.data.tokenizer import ByteTokenizer
    from effarch.models.lm import CausalLM
    from effarch.train import load_model

    if (args.checkpoint is None) == (args.model is None):
        raise UsageError("generate needs exactly one of --checkpoint DIR or --model PRESET")
    if args.checkpoint is not None:
        model = load_model(args.checkpoint)
    else:
        torch.manual_seed(args.seed)
        model = CausalLM(_load_config(args.model))
    prompts = args.prompt or ["def "]
    if not all(prompts):
        raise UsageError("--prompt must not be empty")
    tok = ByteTokenizer()
    options = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        eos_token_id=tok.eos_id,
        prefill_chunk=args.prefill_chunk,
    )
    if len(prompts) == 1:
        out = model.generate(torch.tensor([tok.encode(prompts[0])]), **options)
        sys.stdout.write(tok.decode(out[0]) + "\n")
        return 0
    from effarch.batch_generation import generate_batch

    # Several prompts run as one batch, each continued as if alone; a header line separates the samples.
    encoded = [tok.encode(p) for p in prompts]
    for i, (ids, row) in enumerate(zip(encoded, generate_batch(model, encoded, **options))):
        sys.stdout.write(f"--- sample {i + 1} ---\n" + tok.decode(ids + row.tolist()) + "\n")
    return 0


# ---- arena / bench (the arena package owns their flags) --------------------------------------------
def cmd_arena(args) -> int:
    from effarch.arena import cli as arena_cli

    return arena_cli.run(args)


def cmd_bench(args) -> int:
    from effarch.arena import cli as arena_cli

    return arena_cli.run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="effarch", description="Efficient LLM architectures, measured side by side.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("list", help="registered mixers, FFNs and presets by survey family")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("info", help="parameters and cache bytes of a preset or config file")
    s.add_argument("config", help="preset (name or name:size) or config JSON file")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("train", help="train a model on text (default: the Python standard library's sources)")
    s.add_argument("--model", help="preset (name or name:size) or config JSON; not needed to resume")
    s.add_argument("--data", help="text file, folder of text files, or JSONL with a 'text' field")
    s.add_argument("--out", default="runs/train", help="run folder: checkpoints and metrics.json (resumed if present)")
    s.add_argument("--fresh", action="store_true", help="delete --out first instead of resuming")
    s.add_argument("--steps", type=int, default=200)
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--seq-len", type=int, default=256)
    s.add_argument("--lr", type=float, default=3e-3)
    s.add_argument("--warmup", type=int, default=None)
    s.add_argument("--grad-accum", type=int, default=1)
    s.add_argument("--grad-clip", type=float, default=1.0)
    s.add_argument("--weight-decay", type=float, default=0.1)
    s.add_argument("--eval-every", type=int, default=0)
    s.add_argument("--eval-batches", type=int, default=8)
    s.add_argument("--checkpoint-every", type=int, default=50)
    s.add_argument("--max-bytes", type=int, default=None, help="use at most this many bytes of the data")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto")
    s.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay each step as one CUDA graph (small models: far fewer launches)",
    )
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("generate", help="sample text from a checkpoint (or an untrained preset)")
    s.add_argument("--checkpoint", help="run folder or checkpoint folder")
    s.add_argument("--model", help="preset or config JSON (random weights)")
    s.add_argument(
        "--prompt", action="append", help="prompt text (default 'def '); repeat it to generate several as one batch"
    )
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--prefill-chunk", type=int, default=None, help="feed a long prompt in pieces of this many tokens")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("arena", help="run architectures side by side and write a report")
    try:
        from effarch.arena import cli as arena_cli

        arena_cli.add_arguments(s)
        b = sub.add_parser("bench", help="op-level benchmarks")
        arena_cli.add_bench_arguments(b)
        b.set_defaults(func=cmd_bench)
    except (ImportError, AttributeError):
        pass
    s.set_defaults(func=cmd_arena)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, KeyError, FileNotFoundError, FloatingPointError) as e:
        msg = e.args[0] if e.args else str(e)
        print(f"effarch {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"effarch {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
