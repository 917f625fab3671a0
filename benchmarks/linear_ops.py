"""GPU benchmark of the Triton linear recurrence beside fla 0.6.0, causal SDPA and FlexAttention.

One run: (1) correctness on the GPU, bf16 against the token-by-token reference in float32 at T = 512
(outputs, final states, gradients); (2) forward and forward+backward at B*T = 32K tokens (T = 2K, 4K, 8K,
32K; 128K at B = 1), H = 16, K = V = 128, bf16, median of triton.testing.do_bench, with the first call's time (compile
included); (3) decoding-step latency at batch 1 and 64. Peers that fail to import or refuse an op are
listed as skipped with the reason.
Usage: python benchmarks/linear_ops.py [--check-only | --quick-check] [--peers fla,sdpa,flex]
       [--T 2048,4096,8192,32768,131072] [--write] [--json PATH] [--try "SETTING=a,b;OTHER=c,d"]
--try times our kernels under every combination of the named settings of effarch.ops.linear.triton's launch and
backward modules (block sizes, warps, the state passes' form), a row each, beside the shipped choice's peers;
"A=1,2|B=4,8" sweeps A, then B, each with the other as shipped. Each variant is checked against the reference first.

FLOP counts (per head and token, chunk C = 64): forward additive 2C(K+V) + 4KV, per-key decay the same,
delta adds 2CK + C^2 + 2C(K+V) + 2KV for the WY transform; forward+backward counts 3x the forward. Causal
attention: forward 2 B H T^2 D, forward+backward 3.5x that. GB/s counts the fewest bytes a pass must move
(inputs read once, outputs written once; backward reads q, k, v, dO and writes dq, dk, dv).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from effarch.ops.linear import linear_recurrence_reference  # noqa: E402
from effarch.ops.linear.triton import (  # noqa: E402
    backward,
    launch,
    linear_recurrence_step_triton,
    linear_recurrence_triton,
)

SETTING_MODULES = (launch, backward)  # where --try finds the settings it names

H, D, C = 16, 128, 64
PARTIAL: str | None = None  # --json path, rewritten after every measurement
CASES = {  # name: (rule, decay kind, fla op name)
    "linear attention": ("additive", None, "chunk_linear_attn"),
    "fixed decay [H] (RetNet)": ("additive", "fixed", "chunk_simple_gla"),
    "scalar decay (Mamba2/simple GLA)": ("additive", "scalar", "chunk_simple_gla"),
    "per-key decay (GLA)": ("additive", "per_key", "chunk_gla"),
    "delta rule (DeltaNet)": ("delta", None, "chunk_delta_rule"),
    "gated delta (GDN)": ("delta", "scalar", "chunk_gated_delta_rule"),
}
VARIANTS: list[dict] = [{}]  # --try: kernel settings (launch, backward modules) measured in turn ({}: as shipped)
SHORT = dict(zip(("linear", "fixed", "scalar", "gla", "delta", "gdn"), CASES))  # --ops names


def make(rule, decay, B, T, dtype=torch.bfloat16, seed=0, h0=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, device="cuda", generator=g)
    q, k, v = r(B, T, H, D), r(B, T, H, D), r(B, T, H, D)
    kw = {"rule": rule}
    if decay == "fixed":
        kw["log_decay"] = -torch.rand(H, device="cuda", generator=g) * 0.1
    elif decay == "scalar":
        kw["log_decay"] = F.logsigmoid(r(B, T, H) + 4) / 4
    elif decay == "per_key":
        kw["log_decay"] = F.logsigmoid(r(B, T, H, D) + 4) / 16
    if rule == "delta":
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        kw["beta"] = torch.rand(B, T, H, device="cuda", generator=g)
    if h0:
        kw["initial_state"] = r(B, H, D, D) * 0.1
    return q.to(dtype), k.to(dtype), v.to(dtype), kw


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def run_with_grads(fn, q, k, v, kw, do, dhT, cu=None):
    leaves = {"q": q, "k": k, "v": v, **{n: x for n, x in kw.items() if isinstance(x, torch.Tensor)}}
    leaves = {n: x.detach().clone().requires_grad_() for n, x in leaves.items()}
    args = {n: x for n, x in leaves.items() if n not in ("q", "k", "v")}
    o, f = fn(leaves["q"], leaves["k"], leaves["v"], **args, rule=kw["rule"], output_final_state=True, cu_seqlens=cu)
    grads = torch.autograd.grad((o.float() * do).sum() + (f * dhT).sum(), list(leaves.values()))
    return {"o": o, "final": f, **{f"d{n}": gr for n, gr in zip(leaves, grads)}}


def check(T=512, B=2, modes=("input", "tf32"), layouts=(False, True)) -> list[str]:
    """Rows 'case | rel errs | status' for bf16 kernels against the float32 reference, for each way of
    forming 16-bit products (launch.HALF_DOTS): "input" (the default) or "tf32", and each --try variant (a
    setting the compiler gets wrong on this GPU shows here, before its timing is read)."""
    from effarch.ops.linear.triton import launch

    rows = []
    for (name, (rule, decay, _)), variant in itertools.product(CASES.items(), VARIANTS):
        label = use_variant(variant)
        for varlen in layouts:
            q, k, v, kw = make(rule, decay, B, T, seed=1, h0=True)
            cu = None
            if varlen:  # packed: 3 sequences of uneven lengths, one not a multiple of the chunk
                q, k, v = (x.reshape(1, B * T, H, D) for x in (q, k, v))
                for n in ("log_decay", "beta"):
                    if n in kw and kw[n].dim() > 1:
                        kw[n] = kw[n].reshape(1, B * T, *kw[n].shape[2:])
                cu = torch.tensor([0, 100, 611, B * T], device="cuda")
                kw["initial_state"] = torch.randn(3, H, D, D, device="cuda") * 0.1
            n_seq = kw["initial_state"].shape[0]
            do = torch.randn(*v.shape, device="cuda")
            dhT = torch.randn(n_seq, H, D, D, device="cuda")
            ref_kw = {
                n: (x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x) for n, x in kw.items()
            }
            ref = run_with_grads(linear_recurrence_reference, q.float(), k.float(), v.float(), ref_kw, do, dhT, cu)
            for mode in modes:
                launch.HALF_DOTS = mode
                ours = run_with_grads(linear_recurrence_triton, q, k, v, kw, do, dhT, cu)
                errs = {n: rel(ours[n], ref[n]) for n in ref}
                bad = [n for n, e in errs.items() if not math.isfinite(e) or e > 1e-2]
                tag = f"{label}: {name}{', varlen' if varlen else ''}, {mode} products"
                status = "FAIL " + ",".join(bad) if bad else "ok"
                rows.append(f"| {tag} | " + ", ".join(f"{n} {e:.1e}" for n, e in errs.items()) + f" | {status} |")
                print(rows[-1], flush=True)
            launch.HALF_DOTS = "input"
    return rows


def bench(fn, warmup=25, rep=100) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def timed_first(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def fwd_bwd(call, tensors):
    leaves = [x.detach().requires_grad_() for x in tensors]
    out = call(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    return lambda: torch.autograd.grad(out, leaves, torch.ones_like(out), retain_graph=True)


def flops_linear(rule, B, T):
    per = 2 * C * 2 * D + 4 * D * D
    if rule == "delta":
        per += 2 * C * D + C * C + 2 * C * 2 * D + 2 * D * D
    return per * B * T * H


def ours_case(rule, decay, B, T):
    q, k, v, kw = make(rule, decay, B, T)
    extra = [kw[n] for n in ("log_decay", "beta") if n in kw]
    names = [n for n in ("log_decay", "beta") if n in kw]

    def call(q, k, v, *xs):
        return linear_recurrence_triton(q, k, v, rule=rule, **dict(zip(names, xs)))[0]

    return call, [q, k, v, *extra]


def fla_case(op_name, rule, decay, B, T):
    import fla.ops as fo

    q, k, v, kw = make(rule, decay, B, T)
    g = kw.get("log_decay")
    if op_name == "chunk_linear_attn":
        return (lambda q, k, v: fo.chunk_linear_attn(q, k, v, normalize=False)[0]), [q, k, v]
    if op_name == "chunk_simple_gla":
        if decay == "fixed":
            return (lambda q, k, v: fo.chunk_simple_gla(q, k, v, g_gamma=g)[0]), [q, k, v]
        return (lambda q, k, v, g: fo.chunk_simple_gla(q, k, v, g=g)[0]), [q, k, v, g]
    if op_name == "chunk_gla":
        return (lambda q, k, v, g: fo.chunk_gla(q, k, v, g)[0]), [q, k, v, g]
    if op_name == "chunk_delta_rule":
        return (lambda q, k, v, b: fo.chunk_delta_rule(q, k, v, b)[0]), [q, k, v, kw["beta"].to(q.dtype)]
    return (lambda q, k, v, g, b: fo.chunk_gated_delta_rule(q, k, v, g, b)[0]), [q, k, v, g, kw["beta"].to(q.dtype)]


def attention_cases(B, T, peers):
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cases = {}
    if "sdpa" in peers:
        cases["causal SDPA"] = (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), [q, k, v])
    if "flex" not in peers:
        return cases
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device="cuda")
        flex = torch.compile(flex_attention)
        cases["FlexAttention causal"] = (lambda q, k, v: flex(q, k, v, block_mask=mask), [q, k, v])
    except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
        print(f"FlexAttention skipped: {type(e).__name__}: {e}")
    return cases


def measure(label, call, tensors, flops, nbytes, results, T):
    row = {"op": label, "T": T}
    try:
        row["first_fwd_s"] = timed_first(lambda: call(*tensors))
        row["fwd_ms"] = bench(lambda: call(*tensors))
        step = fwd_bwd(call, tensors)
        row["first_bwd_s"] = timed_first(step)
        row["fwd_bwd_ms"] = bench(lambda: fwd_bwd(call, tensors)())
        row["fwd_tflops"] = flops / row["fwd_ms"] * 1e-9
        row["fwd_bwd_tflops"] = (3.5 if "SDPA" in label or "Flex" in label else 3) * flops / row["fwd_bwd_ms"] * 1e-9
        row["fwd_gbs"] = nbytes / row["fwd_ms"] * 1e-6
        row["fwd_bwd_gbs"] = 3 * nbytes / row["fwd_bwd_ms"] * 1e-6
    except Exception as e:  # noqa: BLE001
        row["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    results.append(row)
    if PARTIAL is not None:  # every row on disk as it lands, so a run stopped early keeps its figures
        Path(PARTIAL).write_text(json.dumps({"results": results}, indent=1))
    done = " ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float))
    print(f"{label:48s} T={T:6d} {done} {row.get('skipped', '')}", flush=True)
    torch.cuda.empty_cache()


def speed(Ts, with_fla, peers, results, deadline=None):
    for T in Ts:
        if deadline is not None and time.monotonic() > deadline:
            print(f"time limit reached: T = {T} and longer not measured", flush=True)
            break
        B = max(1, 32768 // T)  # B*T = 32K tokens; longer T run at B = 1
        io = B * T * H * D * 2
        for name, (rule, decay, fla_op) in CASES.items():
            for variant in VARIANTS:
                label = use_variant(variant)
                call, tensors = ours_case(rule, decay, B, T)
                extra = sum(x.numel() * x.element_size() for x in tensors[3:])
                measure(f"{label}: {name}", call, tensors, flops_linear(rule, B, T), 4 * io + extra, results, T)
                del call, tensors
            if with_fla:
                try:
                    call, tensors = fla_case(fla_op, rule, decay, B, T)
                except Exception as e:  # noqa: BLE001
                    results.append({"op": f"fla {fla_op}: {name}", "T": T, "skipped": f"{type(e).__name__}: {e}"})
                    continue
                measure(f"fla {fla_op}: {name}", call, tensors, flops_linear(rule, B, T), 4 * io + extra, results, T)
                del call, tensors
        for label, (call, tensors) in attention_cases(B, T, peers).items():
            measure(label, call, tensors, 2 * B * H * T * T * D, 4 * io, results, T)


def parse_variants(text: str) -> list[dict]:
    """--try "NAME=a,b;OTHER=c,d" -> every combination, as dicts of launch settings (ints and booleans parsed).
    Groups joined by "|" are swept one after the other, the settings of the other groups as shipped:
    "A=1,2|B=3,4" -> A=1, A=2, B=3, B=4 (four rows rather than the product's four pairs, which grows fast)."""
    variants: list[dict] = []
    for group in text.split("|"):
        axes = []
        for part in [p.strip() for p in group.split(";") if p.strip()]:
            name, _, values = part.partition("=")
            name = name.strip()
            if not any(hasattr(m, name) for m in SETTING_MODULES) or not name.isupper() or not values.strip():
                raise ValueError(
                    f"--try {part!r}: expected NAME=v1,v2 with NAME a setting of the launch or backward module"
                )
            SHIPPED.setdefault(name, getattr(next(m for m in SETTING_MODULES if hasattr(m, name)), name))
            axes.append([(name, _setting_value(v.strip())) for v in values.split(",")])
        variants += [dict(combo) for combo in itertools.product(*axes) if axes]
    return [{}] + variants  # the shipped settings first: every variant is read against them


SHIPPED: dict = {}  # the value each setting named by --try had before any variant was applied


def _setting_value(text: str):
    """ "8" -> 8, "true" / "false" -> True / False (any case), anything else as written."""
    if text.lstrip("-").isdigit():
        return int(text)
    return {"true": True, "false": False}.get(text.lower(), text)


def use_variant(variant: dict) -> str:
    """Applies the settings (every other setting --try named back as shipped); returns the label of the rows
    measured with them."""
    for name, value in {**SHIPPED, **variant}.items():
        setattr(next(m for m in SETTING_MODULES if hasattr(m, name)), name, value)
    return "ours" if not variant else "ours [" + " ".join(f"{n}={v}" for n, v in variant.items()) + "]"


def step_ms(fn, *args, **kwargs) -> float:
    return bench(lambda: fn(*args, **kwargs), warmup=10, rep=50)


def graph_ms(fn, *args, **kwargs) -> float:
    """The step captured in a CUDA graph and replayed (no host overhead), as a decoding loop runs it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn(*args, **kwargs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*args, **kwargs)
    return bench(graph.replay, warmup=10, rep=50)


def decode(with_fla, results):
    for B in (1, 64):
        # The yardstick: a device copy moving the bytes a step must move (the state read and written).
        src = torch.randn(B, H, D, D, device="cuda")
        dst = torch.empty_like(src)
        copy_ms = graph_ms(lambda a, b: b.copy_(a), src, dst)
        nbytes = 2 * src.numel() * 4
        results.append({"op": "state copy (read + write)", "B": B, "graph_ms": copy_ms, "gbs": nbytes / copy_ms * 1e-6})
        print(f"decode B={B:3d} state copy {copy_ms:.4f} ms {nbytes / copy_ms * 1e-6:.0f} GB/s", flush=True)
        for name, (rule, decay, _) in CASES.items():
            if decay == "fixed":
                continue
            q, k, v, kw = make(rule, decay, B, 1)
            state = torch.randn(B, H, D, D, device="cuda")
            kw = {n: x for n, x in kw.items() if n != "initial_state"}
            ms = step_ms(linear_recurrence_step_triton, q, k, v, state, **kw)
            gms = graph_ms(linear_recurrence_step_triton, q, k, v, state, **kw)
            nbytes = 2 * state.numel() * 4 + 4 * B * H * D * 2
            results.append(
                {"op": f"ours decode step: {name}", "B": B, "ms": ms, "graph_ms": gms, "gbs": nbytes / gms * 1e-6}
            )
            print(
                f"decode B={B:3d} {name:36s} {ms:.4f} ms, graph {gms:.4f} ms {nbytes / gms * 1e-6:.0f} GB/s", flush=True
            )
        if with_fla:
            try:
                from fla.ops.gla import fused_recurrent_gla

                q, k, v, kw = make("additive", "per_key", B, 1)
                state = torch.randn(B, H, D, D, device="cuda")
                g = kw["log_decay"]
                ms = step_ms(fused_recurrent_gla, q, k, v, g, initial_state=state, output_final_state=True)
                gms = graph_ms(fused_recurrent_gla, q, k, v, g, initial_state=state, output_final_state=True)
                nbytes = 2 * state.numel() * 4 + 4 * B * H * D * 2
                row = {
                    "op": "fla fused_recurrent_gla step",
                    "B": B,
                    "ms": ms,
                    "graph_ms": gms,
                    "gbs": nbytes / gms * 1e-6,
                }
                results.append(row)
                print(f"decode B={B:3d} fla fused_recurrent_gla {ms:.4f} ms", flush=True)
            except Exception as e:  # noqa: BLE001
                results.append({"op": "fla fused_recurrent_gla step", "B": B, "skipped": f"{type(e).__name__}: {e}"})


def profile(T=8192, with_fla=False) -> str:
    """Per-kernel GPU time of one forward+backward of each case (torch.profiler), top kernels only; with fla,
    its op of the same case after ours, kernel beside kernel."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    B = max(1, 32768 // T)

    def cases():
        for (name, (rule, decay, fla_op)), variant in itertools.product(CASES.items(), VARIANTS):
            yield f"{use_variant(variant)}: {name}", lambda r=rule, d=decay: ours_case(r, d, B, T)
            if with_fla and variant is VARIANTS[-1]:
                yield f"fla {fla_op}: {name}", lambda o=fla_op, r=rule, d=decay: fla_case(o, r, d, B, T)

    lines = []
    for name, make_case in cases():
        try:
            call, tensors = make_case()
            fwd_bwd(call, tensors)()
        except Exception as e:  # noqa: BLE001 - a peer that refuses an op is reported, not fatal
            lines.append(f"{name} (T={T}): skipped: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            print(lines[-1], flush=True)
            continue
        for _ in range(2):
            fwd_bwd(call, tensors)()
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                fwd_bwd(call, tensors)()
            torch.cuda.synchronize()
        rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:9]
        total = sum(e.device_time_total for e in prof.key_averages()) / 3e3
        lines.append(f"{name} (T={T}): GPU total {total:.3f} ms per fwd+bwd; top kernels, ms per call:")
        case_lines = [lines[-1]] + [
            f"    {e.device_time_total / 3e3 / max(1, e.count // 3):8.3f} x{e.count // 3:<3d} {e.key[:90]}"
            for e in rows
        ]
        lines += case_lines[1:]
        print("\n".join(case_lines), flush=True)  # case by case: a peer's long first-call tuning loses nothing
    return "\n".join(lines)


def table(results, check_rows) -> str:
    out = ["Correctness on the GPU (bf16 kernels vs float32 reference):", "", "| case | rel err | status |",
           "|---|---|---|", *check_rows, ""]  # fmt: skip
    out += ["Speed, B*T = 32768 tokens, H = 16, K = V = 128, bf16; ms are medians of do_bench; first = first call in s "
            "(compile/autotune included).", "",
            "| op | T | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | fwd GB/s | first fwd s | first bwd s |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    f = lambda r, k, p=3: f"{r[k]:.{p}f}" if k in r else "-"
    for r in results:
        if "T" not in r:
            continue
        if "skipped" in r and "fwd_ms" not in r:
            out.append(f"| {r['op']} | {r['T']} | skipped: {r['skipped']} | | | | | | |")
            continue
        out.append(f"| {r['op']} | {r['T']} | {f(r, 'fwd_ms')} | {f(r, 'fwd_bwd_ms')} | {f(r, 'fwd_tflops', 1)} | "
                   f"{f(r, 'fwd_bwd_tflops', 1)} | {f(r, 'fwd_gbs', 0)} | {f(r, 'first_fwd_s', 2)} | "
                   f"{f(r, 'first_bwd_s', 2)} |")  # fmt: skip
    out += ["", "Decoding step (T = 1, H = 16, 128x128 float32 state read and written in place); eager = one Python "
            "call, graph = replay of a captured CUDA graph (GB/s from the graph time):", "",
            "| op | B | eager ms | graph ms | GB/s |", "|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        if "B" in r:
            out.append(f"| {r['op']} | {r['B']} | {f(r, 'ms', 4)} | {f(r, 'graph_ms', 4)} | {f(r, 'gbs', 0)} |"
                       if "skipped" not in r else f"| {r['op']} | {r['B']} | skipped: {r['skipped']} | | |")  # fmt: skip
    return "\n".join(out)


def _lengths(text: str, ap: argparse.ArgumentParser) -> list[int]:
    """Comma list of sequence lengths, each a positive multiple of 64 dividing into 32K tokens or longer."""
    try:
        lengths = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        lengths = []
    if not lengths or any(t < 64 or t % 64 for t in lengths):
        ap.error(f"lengths {text!r}: give a comma list of positive multiples of 64, e.g. 8192,32768")
    return lengths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--ops", default=None, help=f"comma list of the rules to run (default all): {', '.join(SHORT)}")
    ap.add_argument("--no-decode", action="store_true", help="skip the decoding-step rows")
    ap.add_argument("--quick-check", action="store_true", help="check dense batches with default products only")
    ap.add_argument("--profile", action="store_true", help="per-kernel times of each case (and of fla's, with fla)")
    ap.add_argument("--profile-T", default="8192", help="lengths of --profile (comma list; B*T = 32K tokens)")
    ap.add_argument("--peers", default="fla,sdpa,flex", help="comma list of peers to measure: fla, sdpa, flex")
    ap.add_argument("--T", default="2048,4096,8192,32768,131072", help="lengths (B*T = 32K tokens; longer at B = 1)")
    ap.add_argument("--write", action="store_true", help="append a dated section to benchmarks/RESULTS.md")
    ap.add_argument("--json", default=None, help="also write the raw numbers to this file")
    ap.add_argument("--time-limit", type=float, default=None, help="start no new length after this many seconds")
    ap.add_argument(
        "--wgmma", default="auto", choices=["auto", "on", "off"], help="Hopper wgmma in our kernels (auto: by width)"
    )
    ap.add_argument(
        "--decay-grad-dots",
        default=None,
        choices=["tf32", "input"],
        help="products of the additive rule's decay-gradient kernels (default: the library's choice)",
    )
    ap.add_argument(
        "--state-bwd-dots",
        default=None,
        choices=["tf32", "input"],
        help="products of the delta rule's reverse state pass (default: the library's choice)",
    )
    ap.add_argument(
        "--try",
        dest="variants",
        default="",
        help='kernel settings to measure side by side, e.g. "STATE_PASS=fused,two_phase;GLA_INTRA_BWD_BK=0,32" '
        '(every combination, each a row of its own); groups joined by "|" are swept one at a time',
    )
    args = ap.parse_args()
    try:
        VARIANTS[:] = parse_variants(args.variants)
    except ValueError as e:
        ap.error(str(e))
    if args.ops is not None:
        chosen = [o.strip() for o in args.ops.split(",") if o.strip()]
        unknown = [o for o in chosen if o not in SHORT]
        if unknown or not chosen:
            ap.error(f"--ops {args.ops!r}: valid names are {', '.join(SHORT)} (comma-separated)")
        for name in [n for short, n in SHORT.items() if short not in chosen]:
            del CASES[name]
    if args.decay_grad_dots is not None:
        backward.DECAY_GRAD_DOTS = args.decay_grad_dots
    if args.state_bwd_dots is not None:
        backward.STATE_BWD_DOTS = args.state_bwd_dots
    if args.wgmma != "auto":
        launch.WGMMA = args.wgmma == "on"
    global PARTIAL
    PARTIAL = args.json
    deadline = None if args.time_limit is None else time.monotonic() + args.time_limit
    peers = set(args.peers.split(","))
    with_fla = "fla" in peers
    if with_fla:
        try:
            import fla

            print(f"fla {fla.__version__}")
        except Exception as e:  # noqa: BLE001
            print(f"fla unavailable: {e}")
            with_fla = False
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    check_rows = check(modes=("input",), layouts=(False,)) if args.quick_check else check()
    if args.profile:
        for T in _lengths(args.profile_T, ap):
            profile(T, with_fla=with_fla)
    results: list[dict] = []
    if not args.check_only:
        speed(_lengths(args.T, ap), with_fla, peers, results, deadline)
        if not args.no_decode:
            decode(with_fla, results)
    text = table(results, check_rows)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"check": check_rows, "results": results}, indent=1))
    if args.write:
        from results import append_section

        append_section("Triton linear recurrence vs fla, SDPA, FlexAttention", text)


if __name__ == "__main__":
    main()
