"""Causal depthwise short convolution + SiLU on [B, T, C]: the Triton kernels against the PyTorch form.

Times the forward and the forward+backward (median of CUDA-event timings) of `effarch.layers.conv.short_conv` +
SiLU (PyTorch: transposes, a zero tail, F.conv1d) and of the Triton kernels (the backward: a dz pass with the weight
gradient, then a dx pass). Prints milliseconds and the GB/s of the minimum traffic (forward: read x, write y;
backward: read x and dy, write dx), and the largest relative difference of every result (output and the three
gradients) from the float32 PyTorch form. On the CPU it is a smoke run of every path under TRITON_INTERPRET=1 at a small shape.
--tiles times the kernels at other tiles (tokens x channels per program, powers of two from 16 to 256) in the same
run, one row each: the kernels' launch settings `BT` and `BC` in effarch.ops.conv.kernels. --dz times the backward's
dz pass at its own tile and warps (`DZ_TILE`, `DZ_WARPS`), one row each.
Usage: python benchmarks/conv_ops.py [--shapes 4x8192x2048,4x8192x1024] [--width 4] [--device cuda|cpu]
       [--tiles 64x64,32x128,...] [--dz 32x64x4,16x64x2,...] [--json PATH] [--write]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from results import measure_and_report, parse_shapes, pick_device

import effarch.ops.conv.kernels as K
from effarch.layers.conv import short_conv


def median_ms(fn, device: torch.device, repeat: int = 20) -> float:
    if device.type != "cuda":  # a smoke timing
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def parse_tiles(text: str, option: str = "--tiles", warps: bool = False) -> list[tuple[int, ...]]:
    """'64x64,32x128' -> [(64, 64), (32, 128)] (with `warps`, '32x64x4' -> (32, 64, 4)); tiles are powers of two
    from 16 to 256, warps 1 to 16; anything else raises one clear sentence."""
    form = "TOKENSxCHANNELSxWARPS" if warps else "TOKENSxCHANNELS"
    example = "32x64x4" if warps else "64x64"
    tiles = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        parts = item.lower().split("x")
        ok = len(parts) == 2 + warps and all(q.isdigit() for q in parts)
        ok = ok and all(int(q) in (16, 32, 64, 128, 256) for q in parts[:2])
        ok = ok and (not warps or int(parts[2]) in (1, 2, 4, 8, 16))
        if not ok:
            raise ValueError(
                f"{option} {text!r}: each is {form}, tiles powers of two from 16 to 256"
                + (", warps 1, 2, 4, 8 or 16" if warps else "")
                + f" ({example})"
            )
        tiles.append(tuple(int(q) for q in parts))
    if not tiles:
        raise ValueError(f"{option} {text!r}: give at least one, e.g. {example}")
    return tiles


def measure(B: int, T: int, C: int, W: int, device: torch.device, tiles=((64, 64),), dz=()) -> list[dict]:
    """One row per tile, then one per dz-pass setting (tokens, channels, warps) at the shipped tile: the PyTorch
    form (timed once) beside the kernels."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, T, C, generator=g).to(device, dtype)
    w = (torch.randn(C, W, generator=g) / W**0.5).to(device, dtype)
    b = (0.1 * torch.randn(C, generator=g)).to(device, dtype)
    dy = torch.randn(B, T, C, generator=g).to(device, dtype)

    def torch_form(xx, ww, bb):
        return F.silu(short_conv(xx, ww, bb)[0])

    # float32 truth
    xr, wr, br = (t.float().requires_grad_() for t in (x, w, b))
    yr = torch_form(xr, wr, br)
    truth = [yr, *torch.autograd.grad(yr, (xr, wr, br), dy.float())]

    def grads(fn):
        xx, ww, bb = (t.clone().requires_grad_() for t in (x, w, b))
        y = fn(xx, ww, bb)
        return [y, *torch.autograd.grad(y, (xx, ww, bb), dy)]

    def kernel_form(xx, ww, bb):
        return K.conv_fwd_op(xx, ww, bb, None, True)

    def timed(name, fn, row):
        out = grads(fn)
        row[f"{name}_err"] = max(rel(o, r) for o, r in zip(out, truth, strict=True))
        leaves = tuple(t.clone().requires_grad_() for t in (x, w, b))
        with torch.no_grad():
            row[f"{name}_fwd_ms"] = median_ms(lambda: fn(x, w, b), device)
        row[f"{name}_fwdbwd_ms"] = median_ms(lambda: torch.autograd.grad(fn(*leaves), leaves, dy), device)

    base = {"B": B, "T": T, "C": C, "W": W, "dtype": str(dtype).replace("torch.", "")}
    timed("pytorch", torch_form, base)
    gb = x.numel() * x.element_size() / 1e9
    rows = []
    shipped = (K.BT, K.BC, K.DZ_TILE, K.DZ_WARPS)
    settings = [(bt, bc, None, K.DZ_WARPS) for bt, bc in tiles] + [(K.BT, K.BC, (t, c), w) for t, c, w in dz]
    try:
        for bt, bc, dz_tile, dz_warps in settings:
            K.BT, K.BC, K.DZ_TILE, K.DZ_WARPS = bt, bc, dz_tile, dz_warps
            label = f"{bt}x{bc}" + ("" if dz_tile is None else f", dz {dz_tile[0]}x{dz_tile[1]} {dz_warps} warps")
            row = {**base, "tile": label}
            timed("triton", kernel_form, row)
            row["triton_bwd_ms"] = row["triton_fwdbwd_ms"] - row["triton_fwd_ms"]  # backward alone
            row["bwd_gbs"] = 3 * gb / row["triton_bwd_ms"] * 1e3
            row["fwd_gbs"] = 2 * gb / row["triton_fwd_ms"] * 1e3
            rows.append(row)
    finally:
        K.BT, K.BC, K.DZ_TILE, K.DZ_WARPS = shipped
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| B x T x C | tile | PyTorch fwd / fwd+bwd ms | Triton fwd / fwd+bwd ms | Triton fwd / bwd GB/s "
        "| max rel. diff PyTorch / Triton |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['B']} x {r['T']} x {r['C']} | {r['tile']} | {r['pytorch_fwd_ms']:.3f} / {r['pytorch_fwdbwd_ms']:.3f} "
            f"| {r['triton_fwd_ms']:.3f} / {r['triton_fwdbwd_ms']:.3f} | {r['fwd_gbs']:.0f} / {r['bwd_gbs']:.0f} "
            f"| {r['pytorch_err']:.1e} / {r['triton_err']:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="4x8192x2048,4x8192x1024,1x32768x4096")
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    p.add_argument("--tiles", default=None, help="tokens x channels per program to time, e.g. 64x64,32x128")
    p.add_argument("--dz", default=None, help="the dz pass's tokens x channels x warps to time, e.g. 32x64x4,16x64x2")
    p.add_argument("--json", default=None)
    p.add_argument("--write", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = p.parse_args()
    try:
        tiles = parse_tiles(args.tiles) if args.tiles else [(K.BT, K.BC)]
        dz = parse_tiles(args.dz, "--dz", warps=True) if args.dz else []
    except ValueError as e:
        p.error(str(e))
    device = pick_device(args.device)
    if not 1 <= args.width <= K.MAX_WIDTH:
        raise SystemExit(f"--width {args.width}: the kernels take widths 1 to {K.MAX_WIDTH}")
    shapes = parse_shapes(args.shapes, fields="BATCHxTOKENSxCHANNELS", example="4x8192x2048")
    measure_and_report(
        shapes, lambda B, T, C: measure(B, T, C, args.width, device, tiles, dz), table, args, device,
        "Short convolution + SiLU: Triton kernels against the PyTorch form",
    )  # fmt: skip


if __name__ == "__main__":
    main()
