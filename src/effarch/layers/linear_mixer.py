"""The skeleton every linear-recurrence token mixer shares: features in, `linear_recurrence`, norm and gate out.

A mixer built on `LinearMixer` only says how it makes its features and, where it departs from the common
path, overrides one hook:

    features(x, ctx) -> Features      q, k [B,T,H,K], v [B,T,H,V], log decay, beta, output gate, extras
    recurrence(f, state, cu_seqlens)  default: S_t = D_t S_{t-1} + k_t^T v_t (or the delta rule),
                                      o_t = scale * q_t S_t, via `effarch.ops.linear.linear_recurrence`
    finish(o, f)                      after both directions are combined (normalisers, skip terms)
    output(o, f, x)                   per-head norm, gate, out projection

The skeleton carries the state (matrix memory "S" [N,H,K,V] float32, short-conv tails "conv_<name>",
the previous token "shift" for token shift, and any state a hook declares with `add_state`), passes
`cu_seqlens` through (states come back one per packed sequence), and runs the bidirectional mode
(`causal=False`): the recurrence over the sequence plus the recurrence over its time reversal, added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from effarch.cache import RecurrentState
from effarch.layers.base import TokenMixer
from effarch.layers.conv import ShortConvolution, joinable, joined_fresh_conv
from effarch.layers.recompute import recomputed
from effarch.layers.rotary import positions_from_cu_seqlens
from effarch.ops import fused
from effarch.ops.linear import linear_recurrence

NORMS = ("rms", "group", "srms", None)
GATES = ("silu", "sigmoid", None)
CHUNK = 64  # chunk length assumed by `flops_per_token` (the chunked form's intra-chunk work)


def upcast(t: torch.Tensor) -> torch.Tensor:
    """t in float32 for gates and decays (float64 stays float64, for exact tests)."""
    return t if t.dtype == torch.float64 else t.float()


def flip_time(x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reverse dim 1; packed documents come out reversed and in reverse order, with their new cu_seqlens."""
    return x.flip(1), flip_cu_seqlens(cu_seqlens)


def flip_cu_seqlens(cu_seqlens: torch.Tensor | None) -> torch.Tensor | None:
    """Boundaries of the packed documents after reversing time: reversed, and in reverse order."""
    return None if cu_seqlens is None else cu_seqlens[-1] - cu_seqlens.flip(0)


def token_shift(
    x: torch.Tensor, last: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B,T,C] -> (x_{t-1} [B,T,C], last token of each sequence [N,C]); zeros before a sequence starts
    (or `last` [B,C], the token before this call)."""
    B, T, C = x.shape
    first = x.new_zeros(B, 1, C) if last is None else last[:, None].to(x.dtype)
    prev = torch.cat([first, x[:, :-1]], dim=1)
    if cu_seqlens is None:
        return prev, x[:, -1]
    starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
    keep = torch.ones(T, dtype=x.dtype, device=x.device)
    keep[starts[starts < T]] = 0.0  # the first token of every document has no predecessor
    nonempty = (ends > starts)[:, None]
    new_last = torch.where(nonempty, x[0, (ends - 1).clamp_min(0)], x.new_zeros(()))
    return prev * keep[None, :, None], new_last


@dataclass
class Features:
    """What the recurrence consumes. q, k [B,T,H,K]; v [B,T,H,V]; log_decay None, [H], [B,T,H] or
    [B,T,H,K]; beta [B,T,H] (delta rule); gate [B,T,H*V] output-gate pre-activation (None: the skeleton's
    own projection of x when the mixer has a gate); extras: per-token tensors [B,T,...] for the hooks."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    log_decay: torch.Tensor | None = None
    beta: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def flipped(self) -> Features:
        """The same features in reversed time (for the backward pass of the bidirectional mode)."""
        per_token = self.log_decay is not None and self.log_decay.dim() > 1
        return replace(
            self,
            q=self.q.flip(1),
            k=self.k.flip(1),
            v=self.v.flip(1),
            log_decay=self.log_decay.flip(1) if per_token else self.log_decay,
            beta=None if self.beta is None else self.beta.flip(1),
            gate=None,
            extras={n: t.flip(1) for n, t in self.extras.items()},
        )


class Context:
    """What a `features` hook needs from the call: carried conv tails and previous token, packing, position."""

    def __init__(self, mixer: LinearMixer, state: RecurrentState | None, cu_seqlens: torch.Tensor | None):
        self.mixer, self.state, self.cu_seqlens = mixer, state, cu_seqlens
        self.offset = 0 if state is None else state.seq_len  # tokens seen before this call
        self.lengths = None if state is None else state.lengths  # [B] per row, when rows differ
        self.new: dict[str, torch.Tensor] = {}  # state pieces produced by this call

    def conv(self, name: str, x: torch.Tensor, splits: tuple[int, ...] | None = None):
        """Short convolution `name` (declared with `add_conv`) over x [B,T,C], tail carried in the state; with
        `splits` (channel widths) its output as one tensor per width, contiguous where the kernel allows."""
        tail = None if self.state is None else self.state[f"conv_{name}"]
        y, new_tail = self.mixer.convs[name](x, tail, cu_seqlens=self.cu_seqlens, splits=splits)
        if new_tail is not None:
            self.new[f"conv_{name}"] = new_tail
        return y

    @property
    def fresh(self) -> bool:
        """Whether the call starts from no carried state (training, a prompt's first piece)."""
        return self.state is None

    def joined_convs(self, names: tuple[str, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The short convolutions `names` over their inputs side by side in x [B,T,sum of their channels]; their
        outputs, one per name. From a fresh start they run as one (`joined_fresh_conv`), else one by one."""
        convs = [self.mixer.convs[n] for n in names]
        widths = [c.weight.shape[0] for c in convs]
        if not (self.fresh and x.shape[1] > 0 and joinable(convs)):
            return tuple(self.conv(n, p) for n, p in zip(names, x.split(widths, dim=-1), strict=True))
        ys, tails = joined_fresh_conv(convs, x, self.cu_seqlens)
        self.new.update({f"conv_{n}": t for n, t in zip(names, tails, strict=True)})
        return ys

    def shift(self, x: torch.Tensor) -> torch.Tensor:
        """x_{t-1} for every t of x [B,T,d_model] (token shift); the last token is kept in the state."""
        last = None if self.state is None else self.state["shift"]
        prev, new_last = token_shift(x, last, self.cu_seqlens)
        if self.mixer.causal:
            self.new["shift"] = new_last
        return prev

    def positions(self, T: int, device: torch.device) -> torch.Tensor:
        """Absolute position of each token [T] inside its own sequence (for rotary embeddings); [B, T] when
        the rows of a carried state have different lengths."""
        if self.cu_seqlens is not None:
            return positions_from_cu_seqlens(self.cu_seqlens, T)
        if self.lengths is not None:
            return self.lengths[:, None] + torch.arange(T, device=device)
        return torch.arange(self.offset, self.offset + T, device=device)

    def lengths_after(self, T: int) -> torch.Tensor | None:
        """Each row's token count after this call [N] (one per packed document), kept in the state so a
        batch of sequences of different lengths continues at each row's own position; None when rows are
        equal."""
        if self.cu_seqlens is not None:
            return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        return None if self.lengths is None else self.lengths + T


class HeadNorm(nn.Module):
    """Output normalisation of o [B,T,H,V]: "rms" per head (weight [V]), "group" = GroupNorm(H, H*V)
    (per-head LayerNorm, affine per channel, as RetNet and RWKV), "srms" = weightless RMS over all H*V
    channels (TransNormerLLM's SRMSNorm), None = nothing."""

    def __init__(self, kind: str | None, n_heads: int, head_dim: int, eps: float):
        super().__init__()
        if kind not in NORMS:
            raise ValueError(f"norm {kind!r} is not one of {NORMS}")
        self.kind, self.eps = kind, eps
        if kind == "rms":
            self.weight = nn.Parameter(torch.ones(head_dim))
        elif kind == "group":
            self.weight = nn.Parameter(torch.ones(n_heads * head_dim))
            self.bias = nn.Parameter(torch.zeros(n_heads * head_dim))

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        of = upcast(o)
        if self.kind == "rms":
            y = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(of.dtype)
        elif self.kind == "srms":
            y = of * torch.rsqrt(of.pow(2).mean((-2, -1), keepdim=True) + self.eps)
        elif self.kind == "group":
            y = F.layer_norm(of, o.shape[-1:], eps=self.eps).flatten(-2)
            y = (y * self.weight.to(of.dtype) + self.bias.to(of.dtype)).view_as(o)
        else:
            return o
        return y.to(o.dtype)


class LinearMixer(TokenMixer):
    """Base of the linear-recurrence mixers; subclasses implement `features` and declare their parts.

    n_heads H, key_dim K and value_dim V are per head; `state_value_dim` is the V of the matrix state when
    it differs from V (e.g. V + 1 with a normaliser column). `norm` and `gate` pick the output stage
    (`HeadNorm` kinds; gate activation "silu" / "sigmoid" / None); with `gate_from_x` the gate is a
    projection of x, otherwise `features` supplies `Features.gate`. `scale` defaults to K**-0.5.
    """

    backend = "auto"  # passed to linear_recurrence; tests set "reference" to compare forms

    def __init__(
        self,
        d_model: int,
        *,
        causal: bool = True,
        layer_idx: int = 0,
        n_heads: int,
        key_dim: int,
        value_dim: int,
        state_value_dim: int | None = None,
        rule: str = "additive",
        scale: float | None = None,
        norm: str | None = "rms",
        gate: str | None = None,
        gate_from_x: bool = True,
        norm_eps: float = 1e-5,
    ):
        super().__init__(d_model, causal=causal, layer_idx=layer_idx)
        for name, value in (("n_heads", n_heads), ("key_dim", key_dim), ("value_dim", value_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} = {value!r} must be a positive integer")
        if gate not in GATES:
            raise ValueError(f"gate {gate!r} is not one of {GATES}")
        if rule not in ("additive", "delta"):
            raise ValueError(f"rule {rule!r} is not one of 'additive', 'delta'")
        self.n_heads, self.key_dim, self.value_dim = n_heads, key_dim, value_dim
        self.state_value_dim = state_value_dim or value_dim
        self.rule = rule
        self.scale = key_dim**-0.5 if scale is None else scale
        self.out_norm = HeadNorm(norm, n_heads, value_dim, norm_eps)
        self.gate = gate
        self.g_proj = nn.Linear(d_model, n_heads * value_dim, bias=False) if gate and gate_from_x else None
        self.o_proj = nn.Linear(n_heads * value_dim, d_model, bias=False)
        self.convs = nn.ModuleDict()
        self.shift_dim = 0
        self.extra_state: dict[str, tuple[int, ...]] = {}

    # ---- parts a subclass declares ---------------------------------------------------------------------
    def add_conv(self, name: str, channels: int, kernel_size: int, *, bias: bool = False, activation="silu"):
        """A short convolution over time, used as `ctx.conv(name, x)`; its tail is carried in the state."""
        self.convs[name] = ShortConvolution(channels, kernel_size, bias=bias, activation=activation, causal=self.causal)

    def add_token_shift(self, channels: int | None = None) -> None:
        """Keep the previous input token in the state, for `ctx.shift(x)`."""
        self.shift_dim = channels or self.d_model

    def add_state(self, name: str, shape: tuple[int, ...]) -> None:
        """An extra per-sequence state [N, *shape] in the matrix state's dtype, produced by `recurrence`."""
        self.extra_state[name] = tuple(shape)

    def split_heads(self, t: torch.Tensor, dim: int | None = None) -> torch.Tensor:
        """[B,T,H*D] -> [B,T,H,D]."""
        return t.unflatten(-1, (self.n_heads, dim or t.shape[-1] // self.n_heads))

    # ---- hooks -------------------------------------------------------------------------------------
    def features(self, x: torch.Tensor, ctx: Context) -> Features:
        raise NotImplementedError

    def recurrence(
        self, f: Features, state: RecurrentState | None, cu_seqlens: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """o [B,T,H,V'] and the new recurrent state pieces ({} in bidirectional mode)."""
        o, S = linear_recurrence(
            f.q,
            f.k,
            f.v,
            log_decay=f.log_decay,
            beta=f.beta,
            rule=self.rule,
            scale=self.scale,
            initial_state=None if state is None else state["S"],
            output_final_state=self.causal,
            cu_seqlens=cu_seqlens,
            backend=self.backend,
        )
        return o, ({} if S is None else {"S": S})

    def finish(self, o: torch.Tensor, f: Features) -> torch.Tensor:
        """o [B,T,H,V'] after both directions are combined -> [B,T,H,V]."""
        return o

    def output(self, o: torch.Tensor, f: Features, x: torch.Tensor) -> torch.Tensor:
        """Norm, gate and out projection: o [B,T,H,V] -> y [B,T,d_model]."""
        B, T = o.shape[:2]
        if self.gate is not None:
            g = (f.gate if f.gate is not None else self.g_proj(x)).reshape(B, T, self.n_heads, self.value_dim)
            if self.out_norm.kind == "rms" and fused.gated_norm_enabled(o.device, o.dtype):
                o = fused.gated_rms_norm(o, self.out_norm.weight, g, self.out_norm.eps, self.gate, backend="triton")
            else:
                o = recomputed(self._gated, self.out_norm(o), g)
        else:
            o = self.out_norm(o)
        return self.o_proj(o.reshape(B, T, -1).to(x.dtype))

    def _gated(self, o: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        g = upcast(g)
        return (upcast(o) * (F.silu(g) if self.gate == "silu" else torch.sigmoid(g))).to(o.dtype)

    # ---- the common forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, state: RecurrentState | None = None, *, cu_seqlens: torch.Tensor | None = None):
        if state is not None and not self.causal:
            raise ValueError("a bidirectional (causal=False) mixer sees the whole sequence and takes no state")
        if state is not None and cu_seqlens is not None:
            raise ValueError("pass either a carried state or cu_seqlens (packed documents start fresh), not both")
        ctx = Context(self, state, cu_seqlens)
        f = self.features(x, ctx)
        if self.causal:
            o, rec = self.recurrence(f, state, cu_seqlens)
        else:
            o, _ = self.recurrence(f, None, cu_seqlens)
            o_back, _ = self.recurrence(f.flipped(), None, flip_cu_seqlens(cu_seqlens))
            o = o + o_back.flip(1)
        y = self.output(self.finish(o, f), f, x)
        if not self.causal:
            return y, None
        seen = 0 if state is None else state.seq_len
        return y, RecurrentState({**ctx.new, **rec}, seq_len=seen + x.shape[1], lengths=ctx.lengths_after(x.shape[1]))

    # ---- accounting --------------------------------------------------------------------------------
    def state_nbytes(self, seq_len: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
        """Matrix state and declared extras in float32 (float64 for float64 models); conv tails and the
        shifted token in the model dtype. Independent of seq_len."""
        matrix = self.n_heads * self.key_dim * self.state_value_dim
        matrix += sum(math.prod(s) for s in self.extra_state.values())
        small = sum(c.weight.shape[0] * (c.kernel_size - 1) for c in self.convs.values()) + self.shift_dim
        esize = torch.tensor([], dtype=dtype).element_size()
        return batch * ((8 if dtype == torch.float64 else 4) * matrix + esize * small)

    def flops_per_token(self, seq_len: int) -> float:
        """Chunked form: intra-chunk scores and values (C (K + V) per head, causal half) plus the state
        read and update (4 K V per head); twice for the bidirectional mode."""
        c = min(CHUNK, max(1, seq_len))
        per_head = c * (self.key_dim + self.state_value_dim) + 4 * self.key_dim * self.state_value_dim
        return float(self.n_heads * per_head * (1 if self.causal else 2))
