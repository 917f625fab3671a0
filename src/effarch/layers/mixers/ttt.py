"""TTT-Linear: the hidden state is a linear model trained on the sequence itself by mini-batch gradient descent.

"Learning to (Learn at Test Time): RNNs with Expressive Hidden States" (arXiv 2407.04620). Per head the
inner model is f(x; W, c) = x + LN(x W + c) with W [K, K], c [K] and a learned LayerNorm; each token
x_s = (k_s, v_s) gives the self-supervised loss

    l(W, c; x_s) = 1/2 || LN(k_s W + c) - (v_s - k_s) ||^2

(the reconstruction target v - k because of the residual; the 1/2 is folded into the learning rate).
Tokens are grouped into mini-batches of b aligned to absolute positions; inside one, every gradient
is taken at the weights W_0 the mini-batch started from (the paper's mini-batch TTT):

    W_t = W_0 - sum_{s in batch, s <= t} eta_s grad_W l(W_0, c_0; x_s),   output z_t = q_t + LN(q_t W_t + c_t),

eta_s = ttt_base_lr * sigmoid(x_s w_lr + b_lr) / head_dim. The outputs inside a mini-batch use the
"dual form" (an attention-like [b, b] product) so W_t is never materialised per token.

State and decoding: because each gradient depends only on W_0 and its own token, the pending tokens of
a partial mini-batch enter only through their summed update. The state therefore holds W_0, c_0 (the
weights at the last mini-batch boundary), the current W, c (W_0 minus the pending updates) and the
position inside the mini-batch: a fixed size, and any split of a sequence, token-by-token decoding
included, gives exactly the outputs of one call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from effarch.cache import RecurrentState
from effarch.layers.base import TokenMixer, check_divisible
from effarch.layers.linear_mixer import flip_time
from effarch.layers.mixers.mamba import check_state_args, state_bytes
from effarch.ops.ttt import ttt_minibatch
from effarch.registry import register_mixer

LN_EPS = 1e-6


def minibatch_segments(pos: int, T: int, size: int) -> list[tuple[int, int, bool]]:
    """Cut T tokens, the first at position `pos` of its mini-batch, at mini-batch boundaries:
    (start, end, whether the piece completes its mini-batch)."""
    out, s = [], 0
    while s < T:
        e = min(T, s + size - (pos if s == 0 else 0))
        out.append((s, e, (pos if s == 0 else 0) + e - s == size))
        s = e
    return out


def segments_of(pos: torch.Tensor | None, T: int, size: int) -> list[tuple[int, int, bool | torch.Tensor]]:
    """`minibatch_segments` for a call starting at positions `pos` [B] of their mini-batches (None: a fresh
    state, at 0, so training never reads the device). One token is one segment whose "completes" is a per-row
    device bool (so decoding steps stay capturable in a CUDA graph); otherwise the rows share a position, read
    once on the host."""
    if pos is None:
        return minibatch_segments(0, T, size)
    if T == 1:
        return [(0, 1, (pos + 1) == size)]
    return minibatch_segments(int(pos[0]) if pos.numel() else 0, T, size)


def keep_where(completes: bool | torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """The start-of-mini-batch weights after a segment: `new` where it completed its mini-batch, else `old`."""
    if isinstance(completes, torch.Tensor):
        return torch.where(completes.view(-1, *([1] * (new.dim() - 1))), new, old)
    return new if completes else old


def run_by_rows(core: Callable, inputs: list[torch.Tensor], state: dict, cu_seqlens: torch.Tensor | None):
    """Run `core(inputs, state) -> (out [B,T,...], state dict)` on independent pieces where needed.

    Packed documents run one by one (each from `state` None, i.e. the initial weights); rows whose
    mini-batch positions differ (a state from a packed call continued as a batch) run row by row.
    """
    if cu_seqlens is not None:
        outs, states = [], []
        bounds = cu_seqlens.tolist()
        for s, e in zip(bounds[:-1], bounds[1:]):
            o, st = core([t[:, s:e] for t in inputs], None)
            outs.append(o)
            states.append(st)
        return torch.cat(outs, 1), {n: torch.cat([st[n] for st in states]) for n in states[0]}
    # One token (decoding) handles each row's position on the device (see `one_token_segment`): no host read.
    if state is not None and inputs[0].shape[1] > 1 and bool((state["pos"] != state["pos"][0]).any()):
        rows = [
            core([t[i : i + 1] for t in inputs], {n: s[i : i + 1] for n, s in state.items()})
            for i in range(inputs[0].shape[0])
        ]
        return torch.cat([o for o, _ in rows]), {n: torch.cat([st[n] for _, st in rows]) for n in rows[0][1]}
    return core(inputs, state)


def bidirectional(direction: Callable, inputs: list[torch.Tensor], cu_seqlens: torch.Tensor | None):
    """Sum of a causal pass over the sequence and one over its time-reverse (re-reversed)."""
    forward = direction(inputs, cu_seqlens)
    flipped = [flip_time(t)[0] for t in inputs]
    return forward + direction(flipped, flip_time(inputs[0], cu_seqlens)[1]).flip(1)


def layer_norm_and_grad(Z: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """d/dZ of 1/2 ||LN(Z) * weight + bias - target||^2 (LN over the last dim), written out by hand so the
    inner gradient step is part of the forward graph that the outer training differentiates."""
    mu = Z.mean(-1, keepdim=True)
    sigma = torch.sqrt(Z.var(-1, unbiased=False, keepdim=True) + LN_EPS)
    Zh = (Z - mu) / sigma
    dZh = (Zh * weight + bias - target) * weight
    return (dZh - dZh.mean(-1, keepdim=True) - Zh * (dZh * Zh).mean(-1, keepdim=True)) / sigma


@register_mixer(
    "ttt_linear",
    family="linear/ttt",
    paper="Learning to (Learn at Test Time): RNNs with Expressive Hidden States (arXiv 2407.04620)",
    debug=dict(n_heads=4, mini_batch_size=4),
    recurrent=True,
)
class TTTLinear(TokenMixer):
    """TTT-Linear layer: per-head linear fast weights trained by mini-batch gradient descent inside the forward."""

    def __init__(
        self,
        d_model: int,
        *,
        causal: bool = True,
        layer_idx: int = 0,
        n_heads: int = 4,
        head_dim: int | None = None,
        mini_batch_size: int = 16,
        ttt_base_lr: float = 1.0,
        use_gate: bool = True,
    ):
        super().__init__(d_model, causal=causal, layer_idx=layer_idx)
        if head_dim is None:
            check_divisible("d_model", d_model, "n_heads", n_heads)
            head_dim = d_model // n_heads
        if n_heads < 1 or head_dim < 1:
            raise ValueError(f"n_heads = {n_heads} and head_dim = {head_dim} must be positive")
        if mini_batch_size < 1:
            raise ValueError(f"mini_batch_size = {mini_batch_size} must be a positive number of tokens")
        if ttt_base_lr <= 0:
            raise ValueError(f"ttt_base_lr = {ttt_base_lr} must be positive")
        self.n_heads, self.head_dim, self.mini_batch_size = n_heads, head_dim, mini_batch_size
        self.ttt_base_lr, self.use_gate = ttt_base_lr, use_gate
        H, K = n_heads, head_dim
        self.qkv_proj = nn.Linear(d_model, 3 * H * K, bias=False)
        self.lr_proj = nn.Linear(d_model, H)  # eta's data-dependent part
        self.W_init = nn.Parameter(torch.empty(H, K, K))  # the inner model's initial weights are learned
        self.b_init = nn.Parameter(torch.empty(H, K))
        self.ttt_norm_weight = nn.Parameter(torch.empty(H, K))
        self.ttt_norm_bias = nn.Parameter(torch.empty(H, K))
        self.post_norm = nn.LayerNorm(H * K, eps=LN_EPS)
        self.g_proj = nn.Linear(d_model, H * K, bias=False) if use_gate else None
        self.o_proj = nn.Linear(H * K, d_model, bias=False)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        nn.init.normal_(self.W_init, 0.0, 0.02)
        self.b_init.zero_()
        self.ttt_norm_weight.fill_(1.0)
        self.ttt_norm_bias.zero_()
        self.lr_proj.bias.zero_()

    def initial_state(self, batch: int, dtype: torch.dtype) -> dict:
        W = self.W_init.to(dtype).expand(batch, -1, -1, -1)
        c = self.b_init.to(dtype).expand(batch, -1, -1)
        pos = torch.zeros(batch, dtype=torch.long, device=self.W_init.device)
        return dict(W0=W, c0=c, W=W, c=c, pos=pos)

    def _core(self, inputs: list[torch.Tensor], state: dict | None):
        """Mini-batch TTT over q, k, v [B,T,H,K] and eta [B,T,H] (compute dtype); returns z [B,T,H,K], state.
        Without gradients on CUDA the loop runs as one Triton kernel (`effarch.ops.ttt`), else in PyTorch."""
        q, k, v, eta = inputs
        st = dict(self.initial_state(q.shape[0], q.dtype) if state is None else state)
        gamma, beta = self.ttt_norm_weight.to(q.dtype), self.ttt_norm_bias.to(q.dtype)
        target = v - k  # the inner model reconstructs v - k from k (the residual form)
        pos_t = (st["pos"] + q.shape[1]) % self.mini_batch_size
        if q.shape[1] == 0:
            return q, dict(W0=st["W0"], c0=st["c0"], W=st["W"], c=st["c"], pos=pos_t)
        fresh = state is None
        Zq, new = ttt_minibatch(
            q, k, target, eta, gamma, beta, st, self.mini_batch_size,
            reference=lambda: self._loop(q, k, target, eta, gamma, beta, st, fresh),
        )  # fmt: skip
        out = q + F.layer_norm(Zq, (Zq.shape[-1],), None, None, LN_EPS) * gamma + beta
        return out, dict(**new, pos=pos_t)

    def _loop(self, q, k, target, eta, gamma, beta, st: dict, fresh: bool) -> tuple[torch.Tensor, dict]:
        """The mini-batch loop in PyTorch (differentiable): read-outs before the output norm, new weights."""
        W0, c0, W, c = st["W0"], st["c0"], st["W"], st["c"]
        zqs = []
        # Only the weight updates are sequential: the target and the read-out's normalisation run once over all
        # mini-batches (in `_core`), so each loop step launches fewer kernels.
        for s, e, completes in segments_of(None if fresh else st["pos"], q.shape[1], self.mini_batch_size):
            X, Q, lr = k[:, s:e], q[:, s:e], eta[:, s:e]
            Z = torch.einsum("blhk,bhkj->blhj", X, W0) + c0[:, None]
            gZ = layer_norm_and_grad(Z, target[:, s:e], gamma, beta)  # [B, L, H, K]
            # Dual form: q_t W_t + c_t = q_t W + c - sum_{s<=t} eta_s (q_t . k_s + 1) gZ_s
            mix = (torch.einsum("bthk,bshk->bhts", Q, X) + 1).tril() * lr.transpose(1, 2)[:, :, None, :]
            zqs.append(torch.einsum("bthk,bhkj->bthj", Q, W) + c[:, None] - torch.einsum("bhts,bshj->bthj", mix, gZ))
            W = W - torch.einsum("bsh,bshk,bshj->bhkj", lr, X, gZ)
            c = c - torch.einsum("bsh,bshj->bhj", lr, gZ)
            W0, c0 = keep_where(completes, W, W0), keep_where(completes, c, c0)
        return torch.cat(zqs, 1), dict(W0=W0, c0=c0, W=W, c=c)

    def forward(self, x: torch.Tensor, state: RecurrentState | None = None, *, cu_seqlens: torch.Tensor | None = None):
        check_state_args(self.causal, state, cu_seqlens)
        B, T, _ = x.shape
        H, K = self.n_heads, self.head_dim
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        q, k, v = (t.to(cd) for t in self.qkv_proj(x).view(B, T, 3, H, K).unbind(2))
        eta = (self.ttt_base_lr / K) * torch.sigmoid(self.lr_proj(x).to(cd))
        inputs = [q, k, v, eta]
        if self.causal:
            z, st = run_by_rows(self._core, inputs, state, cu_seqlens)
            new_state = RecurrentState(st, seq_len=(0 if state is None else state.seq_len) + T)
        else:
            z = bidirectional(lambda ins, cu: run_by_rows(self._core, ins, None, cu)[0], inputs, cu_seqlens)
            new_state = None
        y = self.post_norm(z.reshape(B, T, H * K).to(x.dtype))
        if self.g_proj is not None:
            y = y * F.gelu(self.g_proj(x))
        return self.o_proj(y), new_state

    def state_nbytes(self, seq_len: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
        H, K = self.n_heads, self.head_dim
        return state_bytes(dtype, matrix=2 * batch * (H * K * K + H * K)) + 8 * batch  # + int64 positions

    def flops_per_token(self, seq_len: int) -> float:
        H, K, b = self.n_heads, self.head_dim, self.mini_batch_size
        return H * (10.0 * K * K + 4.0 * b * K)  # inner forward, gradient, update and dual-form read-out
