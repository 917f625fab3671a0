"""Triton kernel of TTT-Linear's mini-batch loop (inference): one program per (sequence, head).

Per mini-batch of tokens [s, e) (the first may start inside a mini-batch, at the state's position `pos`):
    Z = X W0 + c0,  gZ = d/dZ 1/2 ||LN(Z) gamma + beta - Y||^2,
    z = Q W + c - (tril(Q X^T + 1) * eta_s) gZ,   W -= X^T (eta gZ),  c -= sum_s eta_s gZ_s,
and W0, c0 = W, c when the mini-batch completes; exactly the PyTorch loop of `TTTLinear._loop`, with the
weights kept in registers and every product in exact float32.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LN_EPS = 1e-6  # as TTTLinear


@triton.jit
def ttt_minibatch_kernel(
    q, k, y, eta, gamma, beta, W0, c0, W, c, pos, z, W0_out, c0_out, W_out, c_out,
    T,
    H: tl.constexpr,
    K: tl.constexpr,
    SIZE: tl.constexpr,
    EPS: tl.constexpr,
):  # fmt: skip
    """Token tensors [B, T, H, K] float32 contiguous, eta [B, T, H], weights [B, H, K, K] and [B, H, K],
    gamma/beta [H, K], pos [B] int64; z [B, T, H, K]. Grid (B * H,)."""
    i_bh = tl.program_id(0)
    i_b = i_bh // H
    i_h = i_bh % H
    rk = tl.arange(0, K)
    rl = tl.arange(0, SIZE)
    off_kk = i_bh.to(tl.int64) * K * K + rk[:, None] * K + rk[None, :]
    off_k = i_bh.to(tl.int64) * K + rk
    w0 = tl.load(W0 + off_kk)
    b0 = tl.load(c0 + off_k)
    w = tl.load(W + off_kk)
    b = tl.load(c + off_k)
    g = tl.load(gamma + i_h * K + rk)
    bt = tl.load(beta + i_h * K + rk)
    p0 = tl.load(pos + i_b)
    causal = rl[:, None] >= rl[None, :]
    for j in range(0, (T + p0 + SIZE - 1) // SIZE):
        s = tl.maximum(j * SIZE - p0, 0)
        e = tl.minimum((j + 1) * SIZE - p0, T)
        rt = s + rl
        mt = rt < e
        row = (i_b * T + rt).to(tl.int64) * H + i_h
        off = row[:, None] * K + rk[None, :]
        X = tl.load(k + off, mask=mt[:, None], other=0.0)
        Q = tl.load(q + off, mask=mt[:, None], other=0.0)
        Y = tl.load(y + off, mask=mt[:, None], other=0.0)
        lr = tl.load(eta + row, mask=mt, other=0.0)  # 0 on rows past the segment: they update nothing
        Z = tl.dot(X, w0, input_precision="ieee") + b0[None, :]
        d = Z - (tl.sum(Z, axis=1) / K)[:, None]
        sig = tl.sqrt(tl.sum(d * d, axis=1) / K + EPS)
        Zh = d / sig[:, None]
        dZh = (Zh * g[None, :] + bt[None, :] - Y) * g[None, :]
        gZ = (dZh - (tl.sum(dZh, axis=1) / K)[:, None] - Zh * (tl.sum(dZh * Zh, axis=1) / K)[:, None]) / sig[:, None]
        mix = tl.where(causal, tl.dot(Q, tl.trans(X), input_precision="ieee") + 1.0, 0.0) * lr[None, :]
        zq = tl.dot(Q, w, input_precision="ieee") + b[None, :] - tl.dot(mix, gZ, input_precision="ieee")
        tl.store(z + off, zq, mask=mt[:, None])
        lg = gZ * lr[:, None]
        w = w - tl.dot(tl.trans(X), lg, input_precision="ieee")
        b = b - tl.sum(lg, axis=0)
        if (j + 1) * SIZE - p0 <= T:  # the mini-batch is complete: its end weights start the next one
            w0 = w
            b0 = b
    tl.store(W0_out + off_kk, w0)
    tl.store(c0_out + off_k, b0)
    tl.store(W_out + off_kk, w)
    tl.store(c_out + off_k, b)


def triton_supports(q: torch.Tensor, gamma: torch.Tensor, state: dict, size: int) -> bool:
    """float32 inputs on CUDA (or under TRITON_INTERPRET=1), head dim 16-64 and mini-batches of 16-64 tokens
    (powers of two), at least one token, and nothing that needs a gradient."""
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    K = q.shape[-1]
    if q.dtype != torch.float32 or K not in (16, 32, 64) or size not in (16, 32, 64) or q.shape[1] == 0:
        return False
    tensors = [q, gamma, *(state[n] for n in ("W0", "c0", "W", "c"))]
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def ttt_minibatch_triton(q, k, target, eta, gamma, beta, state: dict, size: int) -> tuple[torch.Tensor, dict]:
    """See `effarch.ops.ttt.ttt_minibatch`; inputs as `triton_supports` accepts."""
    B, T, H, K = q.shape
    q, k, target, eta = (t.contiguous() for t in (q, k, target, eta))
    W0, c0, W, c = (state[n].to(torch.float32).contiguous() for n in ("W0", "c0", "W", "c"))
    z = torch.empty_like(q)
    out = {"W0": torch.empty_like(W0), "c0": torch.empty_like(c0), "W": torch.empty_like(W), "c": torch.empty_like(c)}
    ttt_minibatch_kernel[(B * H,)](
        q, k, target, eta, gamma.contiguous(), beta.contiguous(), W0, c0, W, c, state["pos"].contiguous(), z,
        out["W0"], out["c0"], out["W"], out["c"], T, H, K, size, LN_EPS, num_warps=4,
    )  # fmt: skip
    return z, out
