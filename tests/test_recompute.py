"""`recomputed`: the same values and gradients as the plain chain, holding only its inputs for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from effarch.layers.norm import GatedRMSNorm
from effarch.layers.recompute import recomputed


def _saved_bytes(fn, *args) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of fn(*args)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args).sum().backward()
    return sum(seen.values())


def test_values_and_gradients_equal_the_plain_chain():
    w = torch.randn(24, dtype=torch.float64, requires_grad=True)

    def chain(o, g):
        y = o * F.silu(g)
        return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    o = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 5, 24, dtype=torch.float64)
    plain = chain(o, g)
    grads = torch.autograd.grad((plain * up).sum(), (o, g, w))
    ours = recomputed(chain, o, g)
    ours_grads = torch.autograd.grad((ours * up).sum(), (o, g, w))
    assert torch.equal(ours, plain)
    for a, b in zip(ours_grads, grads):
        assert torch.equal(a, b)


def test_only_the_inputs_are_kept_for_backward():
    o = torch.randn(4, 64, 32).bfloat16().requires_grad_()
    g = torch.randn(4, 64, 32).bfloat16().requires_grad_()

    def gate(o, g):
        return (o.float() * F.silu(g.float())).to(o.dtype)

    plain, ours = _saved_bytes(gate, o, g), _saved_bytes(lambda a, b: recomputed(gate, a, b), o, g)
    inputs = 2 * o.numel() * o.element_size()
    assert ours == inputs
    assert plain >= inputs + 2 * o.numel() * 4  # at least two float32 copies besides


def test_without_gradients_it_is_a_plain_call():
    calls = []

    def fn(x):
        calls.append(torch.is_grad_enabled())
        return x * 2

    with torch.no_grad():
        y = recomputed(fn, torch.randn(3, requires_grad=True))
    assert calls == [False] and not y.requires_grad


def test_gated_rms_norm_equals_its_plain_chain_and_trains_its_weight():
    torch.manual_seed(0)
    norm = GatedRMSNorm(16)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(16) + 0.5)
    x = torch.randn(2, 7, 16, requires_grad=True)
    gate = torch.randn(2, 7, 16, requires_grad=True)
    up = torch.randn(2, 7, 16)
    y, ref = norm(x, gate), norm._gated(x, gate)  # recomputed, and the chain kept whole
    assert torch.equal(y, ref)
    got = torch.autograd.grad((y * up).sum(), (x, gate, norm.weight))
    want = torch.autograd.grad((ref * up).sum(), (x, gate, norm.weight))
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert got[2].abs().sum() > 0


@pytest.mark.parametrize("T", [1, 2, 9])
@pytest.mark.parametrize("with_tail", [False, True])
def test_short_convolution_training_path_equals_the_plain_one(T, with_tail):
    """With gradients the conv keeps only its input and recomputes; values, gradients and the carried tail
    equal the plain path (T shorter than the tail too)."""
    from effarch.layers.conv import ShortConvolution

    torch.manual_seed(0)
    conv = ShortConvolution(6, kernel_size=4, bias=True).double()
    x = torch.randn(2, T, 6, dtype=torch.float64, requires_grad=True)
    tail = torch.randn(2, 3, 6, dtype=torch.float64) if with_tail else None
    y, new_tail = conv(x, tail)
    y_ref, tail_ref = conv._conv_act_tail(x, tail)
    assert torch.equal(y, y_ref) and torch.equal(new_tail, tail_ref)
    up = torch.randn_like(y)
    got = torch.autograd.grad((y * up).sum(), (x, conv.weight, conv.bias))
    want = torch.autograd.grad((y_ref * up).sum(), (x, conv.weight, conv.bias))
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    kept = _saved_bytes(lambda a: conv(a, tail)[0], x)
    assert kept <= x.numel() * 8 + (tail.numel() * 8 if with_tail else 0)  # the input (and tail) only
