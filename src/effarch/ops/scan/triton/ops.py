"""The Triton selective scan as torch.library custom ops (with fake implementations, so torch.compile traces
through them), their launches, and the public entry point built on them."""

from __future__ import annotations

import os

import torch
from torch import Tensor

from effarch.ops.custom_op import KernelCall
from effarch.ops.grid import cdiv, dense_offsets, next_power_of_2
from effarch.ops.partials import sum_partials
from effarch.ops.scan.checks import check_scan_inputs
from effarch.ops.scan.parallel import selective_scan_parallel
from effarch.ops.scan.triton import KERNEL_DTYPES, MAX_N, kernels

CHUNK: int | None = None  # tokens between the states the forward saves for the backward; None: `_chunk_len`
MAX_BLOCK_D = 64  # channels per program at most
# BD * BN at most, and state elements per thread: the backward keeps about six [BD, BN] float32 tiles in
# registers. Compiled for sm_90 (ptxas -v), these choices spill no registers for N = 4 to 256; 8 elements
# per thread in the backward spilled.
MAX_BLOCK_STATE = 1024
FWD_PER_THREAD = 16
BWD_PER_THREAD = 4
MAX_BWD_PROGRAMS = 1024  # backward programs at most: bounds its scratch (one slab per program) for any NS
POISON = False  # tests set this: every buffer starts as NaN, so a value no kernel wrote cannot pass


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    out = torch.empty(*shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if POISON else out


def _none(like: Tensor) -> Tensor:
    return like.new_empty(0, dtype=torch.float32)


def _n_chunks(T: int, n_seq: int, dense_len: int, chunk: int) -> int:
    """Room for every sequence's chunk-start states: exact for a dense batch, an upper bound (no host sync)
    for packed sequences, since sum ceil(L_i / C) <= T / C + NS."""
    if dense_len > 0:
        return n_seq * cdiv(dense_len, chunk)
    return T // chunk + n_seq


def _seq_chunk(cu: Tensor, chunk: int) -> Tensor:
    """First chunk-start slot of each sequence [NS] (int64, on the device)."""
    per = (cu[1:] - cu[:-1] + chunk - 1) // chunk
    return torch.cumsum(per, 0) - per


def _block_d(n_seq: int, G: int, DG: int, N: int, device: torch.device) -> int:
    """Channels per program: as many as fit (fewer programs re-reading B and C, fewer dB/dC partials) while
    the grid still has about two programs per streaming multiprocessor to keep the GPU busy."""
    bn = next_power_of_2(N)
    bd = min(MAX_BLOCK_D, next_power_of_2(DG), max(1, MAX_BLOCK_STATE // bn))
    target = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    while bd > 8 and n_seq * G * cdiv(DG, bd) < target:
        bd //= 2
    return bd


def _chunk_len(n_seq: int, D: int, N: int, device: torch.device) -> int:
    """Tokens per chunk, 16 to 64. The backward's slabs, CHUNK x N x 4 bytes per channel of every program in
    the grid, should stay in L2: 64 when they fit in half of it, down to 16 for large batches. The saved
    chunk-start states cost 4 N / CHUNK bytes per token and channel (1 byte at N = 16, CHUNK = 64)."""
    if CHUNK is not None:
        return CHUNK
    if device.type != "cuda":
        return 64
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    channels = min(n_seq * D, MAX_BWD_PROGRAMS * MAX_BLOCK_D)
    chunk = 64
    while chunk > 16 and 2 * chunk * 4 * channels * N > l2:
        chunk //= 2
    return chunk


def _launch_shape(x: Tensor, A: Tensor, B: Tensor, cu: Tensor, per_thread: int) -> tuple[int, ...]:
    """(NS, D, N, G, DG, NB, BD, BN, number of warps) for packed x [T, D], B [T, G, N], with about
    `per_thread` state elements per thread."""
    n_seq, (_, D), (_, G, N) = cu.numel() - 1, x.shape, B.shape
    DG = D // G
    BD = _block_d(n_seq, G, DG, N, x.device)
    BN = next_power_of_2(N)
    warps = max(1, min(8, BD * BN // (32 * per_thread)))
    return n_seq, D, N, G, DG, cdiv(DG, BD), BD, BN, warps


def scan_fwd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    h0: Tensor | None,
    cu: Tensor,
    dt_softplus: bool,
    dense_len: int,
    chunk: int,
    store_final: bool,
    save_states: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Packed x, dt, z [T, D], B, C [T, G, N], A [D, N], D, dt_bias [D] and h0 [NS, D, N] float32, cu [NS+1]
    int64 -> (y [T, D] in x's dtype, final states [NS, D, N] float32 or empty, chunk-start states
    [NC, D, N] float32 or empty)."""
    n_seq, Dc, N, G, DG, NB, BD, BN, warps = _launch_shape(x, A, B, cu, FWD_PER_THREAD)
    y = _empty(*x.shape, dtype=x.dtype, device=x.device)
    hT = _empty(n_seq, Dc, N, dtype=torch.float32, device=x.device) if store_final else _none(x)
    n_chunks = _n_chunks(x.shape[0], n_seq, dense_len, chunk) if save_states else 0
    hc = _empty(n_chunks, Dc, N, dtype=torch.float32, device=x.device) if save_states else _none(x)
    kernels.scan_fwd_kernel[(n_seq, G * NB)](
        x, dt, A, B, C, x if D is None else D, x if z is None else z, x if dt_bias is None else dt_bias,
        x if h0 is None else h0, y, y if not store_final else hT, y if not save_states else hc,
        cu, _seq_chunk(cu, chunk), Dc, N, G, DG, NB, BD, BN, chunk, dt_softplus, D is not None, z is not None,
        dt_bias is not None, h0 is not None, store_final, save_states, num_warps=warps,
    )  # fmt: skip
    return y, hT, hc


scan_fwd_op_call = KernelCall("effarch::selective_scan_fwd", scan_fwd)
scan_fwd_op = scan_fwd_op_call.op


@scan_fwd_op.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, h0, cu, dt_softplus, dense_len, chunk, store_final, save_states):
    n_seq, Dc, N = cu.shape[0] - 1, x.shape[1], A.shape[1]
    hT = x.new_empty(n_seq, Dc, N, dtype=torch.float32) if store_final else _none(x)
    n_chunks = _n_chunks(x.shape[0], n_seq, dense_len, chunk)
    hc = x.new_empty(n_chunks, Dc, N, dtype=torch.float32) if save_states else _none(x)
    return torch.empty_like(x), hT, hc


def scan_bwd(
    dy: Tensor,
    dhT: Tensor | None,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    hc: Tensor,
    cu: Tensor,
    dt_softplus: bool,
    chunk: int,
    has_h0: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dh0), each in its input's dtype; dD, dz, ddt_bias and dh0 are
    empty when D, z, dt_bias or the initial state is absent."""
    n_seq, Dc, N, G, DG, NB, BD, BN, warps = _launch_shape(x, A, B, cu, BWD_PER_THREAD)
    T, dev = x.shape[0], x.device
    dx = _empty(*x.shape, dtype=x.dtype, device=dev)
    ddt = _empty(*dt.shape, dtype=dt.dtype, device=dev)
    dz = _empty(*z.shape, dtype=z.dtype, device=dev) if z is not None else _none(x)
    dB_part = _empty(NB, T, G, N, dtype=torch.float32, device=dev)
    dC_part = _empty(NB, T, G, N, dtype=torch.float32, device=dev)
    dA_part = _empty(n_seq, Dc, N, dtype=torch.float32, device=dev)
    dD_part = _empty(n_seq, Dc, dtype=torch.float32, device=dev) if D is not None else _none(x)
    dbias_part = _empty(n_seq, Dc, dtype=torch.float32, device=dev) if dt_bias is not None else _none(x)
    dh0 = _empty(n_seq, Dc, N, dtype=torch.float32, device=dev) if has_h0 else _none(x)
    rows = min(n_seq, max(1, MAX_BWD_PROGRAMS // (G * NB)))  # each program row walks every rows-th sequence
    scratch = torch.empty(rows * G * NB, chunk, BD, BN, dtype=torch.float32, device=dev)
    kernels.scan_bwd_kernel[(rows, G * NB)](
        x, dt, A, B, C, x if D is None else D, x if z is None else z, x if dt_bias is None else dt_bias, hc, dy,
        x if dhT is None else dhT, dx, ddt, dx if z is None else dz, dB_part, dC_part, dA_part,
        dx if D is None else dD_part, dx if dt_bias is None else dbias_part, dx if not has_h0 else dh0, scratch,
        cu, _seq_chunk(cu, chunk), T, n_seq, Dc, N, G, DG, NB, BD, BN, chunk, dt_softplus, D is not None,
        z is not None, dt_bias is not None, dhT is not None, has_h0, num_warps=warps,
    )  # fmt: skip
    return (
        dx,
        ddt,
        sum_partials(dA_part, A.dtype),
        sum_partials(dB_part, B.dtype),
        sum_partials(dC_part, C.dtype),
        sum_partials(dD_part, D.dtype) if D is not None else dD_part,
        dz,
        sum_partials(dbias_part, dt_bias.dtype) if dt_bias is not None else dbias_part,
        dh0,
    )


scan_bwd_op_call = KernelCall("effarch::selective_scan_bwd", scan_bwd)
scan_bwd_op = scan_bwd_op_call.op


@scan_bwd_op.register_fake
def _(dy, dhT, x, dt, A, B, C, D, z, dt_bias, hc, cu, dt_softplus, chunk, has_h0):
    n_seq = cu.shape[0] - 1
    return (
        torch.empty_like(x),
        torch.empty_like(dt),
        torch.empty_like(A),
        torch.empty_like(B),
        torch.empty_like(C),
        torch.empty_like(D) if D is not None else _none(x),
        torch.empty_like(z) if z is not None else _none(x),
        torch.empty_like(dt_bias) if dt_bias is not None else _none(x),
        x.new_empty(n_seq, x.shape[1], A.shape[1], dtype=torch.float32) if has_h0 else _none(x),
    )


def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, z, dt_bias, h0, cu, dt_softplus, dense_len, chunk, store_final, save_states = inputs
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, cu, output[2])
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)  # no zero tensors for the kept chunk states or an unused final state
    ctx.args = (dt_softplus, chunk, h0 is not None)


def _backward(ctx, dy, dhT, _dhc):
    x, dt, A, B, C, D, z, dt_bias, cu, hc = ctx.saved_tensors
    dt_softplus, chunk, has_h0 = ctx.args
    if hc.numel() == 0 and x.shape[0] > 0:
        raise RuntimeError("selective_scan: the Triton forward ran without saving chunk states for a backward")
    dhT = dhT.contiguous() if dhT is not None and dhT.numel() > 0 else None  # may arrive expanded (stride 0)
    dx, ddt, dA, dB, dC, dD, dz, dbias, dh0 = scan_bwd_op_call(
        torch.zeros_like(x) if dy is None else dy.contiguous(),
        dhT,
        x,
        dt,
        A,
        B,
        C,
        D,
        z,
        dt_bias,
        hc,
        cu,
        dt_softplus,
        chunk,
        has_h0,
    )
    return (
        dx,
        ddt,
        dA,
        dB,
        dC,
        dD if D is not None else None,
        dz if z is not None else None,
        dbias if dt_bias is not None else None,
        dh0 if has_h0 else None,
        None,
        None,
        None,
        None,
        None,
        None,
    )


scan_fwd_op_call.differentiable(_setup_context, _backward)


def _needs_grad(*xs: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in xs)


def _check_runs_here(x: Tensor, dt: Tensor, B: Tensor, C: Tensor, z: Tensor | None, N: int) -> None:
    for name, t in (("x", x), ("dt", dt), ("B", B), ("C", C), ("z", z)):
        if t is not None and t.dtype not in KERNEL_DTYPES:
            raise ValueError(
                f"selective_scan backend 'triton' takes float32, bfloat16 or float16 inputs; got {name} of "
                f"dtype {t.dtype} (use backend='torch' or 'auto')"
            )
    if N > MAX_N:
        raise ValueError(f"selective_scan backend 'triton' takes d_state N <= {MAX_N}; got N = {N}")
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"selective_scan backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1); got {x.device}")


def selective_scan_triton(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    *,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Triton form of `effarch.ops.scan.selective_scan` (same arguments and result) with autograd; float32,
    bfloat16 and float16 inputs, state float32, d_state up to 256."""
    inp = check_scan_inputs(x, dt, A, B, C, D, z, dt_bias, initial_state, cu_seqlens)
    _check_runs_here(x, dt, B, C, z, inp.N)
    Bs, T, Dc, G, N = inp.batch, inp.T, inp.D, inp.G, inp.N
    if Bs * T == 0:  # nothing to walk: the PyTorch form returns the empty output and the initial states
        return selective_scan_parallel(
            x, dt, A, B, C, D, z, dt_bias=dt_bias, dt_softplus=dt_softplus, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens,
        )  # fmt: skip
    flat = lambda t: t.reshape(Bs * T, *t.shape[2:]).contiguous()
    bc = lambda t: flat(t).view(Bs * T, G, N)
    f32 = lambda t: None if t is None else t.float().contiguous()
    if cu_seqlens is None:
        cu, dense_len = dense_offsets(Bs, T, x.device, torch.int64), T
    else:
        cu, dense_len = cu_seqlens.to(device=x.device, dtype=torch.int64), 0
    save = _needs_grad(x, dt, A, B, C, D, z, dt_bias, initial_state)
    chunk = _chunk_len(inp.n_sequences, Dc, N, x.device)
    y, final, _ = scan_fwd_op_call(
        flat(x), flat(dt), f32(A), bc(B), bc(C), f32(D), None if z is None else flat(z), f32(dt_bias),
        f32(initial_state), cu, dt_softplus, dense_len, chunk, output_final_state, save,
    )  # fmt: skip
    return y.view(Bs, T, Dc), final if output_final_state else None
