"""Projections of one input as one autograd node (effarch.layers.projections) equal separate nn.Linear calls, in
outputs and in every gradient, alone and inside the mixers that use them."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from torch import nn

from effarch import registry
from effarch.layers import projections
from effarch.layers.projections import project

D = 32


def _linears(dtype=torch.float64, bias=False):
    g = torch.Generator().manual_seed(0)
    layers = [nn.Linear(D, n, bias=bias, dtype=dtype) for n in (24, 8, 40)]
    with torch.no_grad():
        for m in layers:
            m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=dtype))
    return layers


def _outputs_and_grads(x, layers, shared: bool, monkeypatch):
    monkeypatch.setattr(projections, "SHARED_PROJECTIONS", shared)
    x = x.clone().requires_grad_()
    for m in layers:
        if m is not None:
            m.zero_grad()
    outs = project(x, layers)
    loss = sum(
        (o * torch.randn_like(o, generator=torch.Generator().manual_seed(i))).sum()
        for i, o in enumerate(outs)
        if o is not None
    )
    loss.backward()
    return [o.detach() for o in outs if o is not None], x.grad, [m.weight.grad.clone() for m in layers if m is not None]


def test_one_node_equals_separate_layers(monkeypatch):
    """Outputs, dx (accumulated in place) and each weight's gradient equal the separate layers', with a None in
    the list kept in place; the shared path is one autograd node."""
    layers = _linears()
    x = torch.randn(3, 5, D, dtype=torch.float64)
    with_none = [layers[0], None, layers[1], layers[2]]
    ours = _outputs_and_grads(x, with_none, True, monkeypatch)
    ref = _outputs_and_grads(x, with_none, False, monkeypatch)
    for a, b in zip(ours[0] + [ours[1]] + ours[2], ref[0] + [ref[1]] + ref[2], strict=True):
        assert_close(a, b, tol=1e-12)
    monkeypatch.setattr(projections, "SHARED_PROJECTIONS", True)
    outs = project(x.requires_grad_(), with_none)
    assert outs[1] is None
    assert outs[0].grad_fn is outs[2].grad_fn and type(outs[0].grad_fn).__name__.startswith("_SharedInputLinear")


def test_plain_layers_where_one_node_does_not_apply(monkeypatch):
    """Biases, a single layer, no gradient or autocast: each layer is called as it is."""
    monkeypatch.setattr(projections, "SHARED_PROJECTIONS", True)
    x = torch.randn(2, D, dtype=torch.float64, requires_grad=True)
    for layers in (_linears(bias=True), _linears()[:1]):
        assert all(type(o.grad_fn).__name__ != "_SharedInputLinearBackward" for o in project(x, layers))
    with torch.no_grad():
        assert all(o.grad_fn is None for o in project(x, _linears()))
    layers = _linears(dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = project(x.float(), layers)
    assert all("Shared" not in type(o.grad_fn).__name__ for o in outs)


@pytest.mark.parametrize("name", ["gla", "deltanet", "gated_deltanet", "attn"])
def test_mixers_with_shared_projections_equal_separate_ones(name, monkeypatch):
    """GLA, DeltaNet and Gated DeltaNet (output gate on) and attention (q and kv) give the same outputs and
    gradients with their input projections in one node as with one nn.Linear each."""
    entry = registry.get("mixer", name)
    kw = {"use_gate": True} if "deltanet" in name else {}
    torch.manual_seed(0)
    m = entry.obj(D, **{**entry.debug, **kw}).double()
    with torch.no_grad():  # random values everywhere, so every gate matters
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 20, D, dtype=torch.float64)
    calls = []
    apply = projections._SharedInputLinear.apply
    monkeypatch.setattr(projections._SharedInputLinear, "apply", lambda *a: calls.append(len(a) - 1) or apply(*a))
    results = {}
    for shared in (False, True):
        monkeypatch.setattr(projections, "SHARED_PROJECTIONS", shared)
        m.zero_grad()
        xx = x.clone().requires_grad_()
        y, _ = m(xx)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        results[shared] = [y.detach(), xx.grad] + [p.grad.clone() for p in m.parameters()]
    # weights in the node: the delta mixers' q, k and v as one joined weight (their convolutions run as one), and
    # Gated DeltaNet's two gate projections as one more
    assert calls == [{"gla": 5, "deltanet": 3, "gated_deltanet": 3, "attn": 2}[name]]
    for a, b in zip(results[True], results[False], strict=True):
        assert_close(a, b, tol=1e-10)


def test_compiled_model_with_shared_projections_equals_eager(monkeypatch):
    """A GLA model compiled block by block (effarch.compile) with shared projections gives the eager model's loss
    and gradients. The shared projections' autograd function is what is traced: aot_eager traces it as inductor
    would, without half a minute of C++ code generation (test_compile.py compiles a model with inductor)."""
    from effarch import build_model
    from effarch.compile import compile_model

    monkeypatch.setattr(projections, "SHARED_PROJECTIONS", True)
    torch.manual_seed(0)
    model = build_model("gla:debug")
    ids = torch.randint(0, 260, (2, 16))

    def run(m):
        m.zero_grad(set_to_none=True)
        out = m(ids, targets=ids.roll(-1, 1))
        out.loss.backward()
        return [out.loss.detach()] + [p.grad.clone() for p in m.parameters()]

    eager = run(model)
    compiled = run(compile_model(model, backend="aot_eager"))
    for a, b in zip(compiled, eager, strict=True):
        assert_close(a.reshape(-1), b.reshape(-1), tol=1e-5)
