"""effarch.ops.custom_op: a kernel runs its plain function in eager mode and its custom op under torch.compile,
with the same gradient either way."""

from __future__ import annotations

import torch
from torch import Tensor

from effarch.ops.custom_op import KernelCall

calls: list[str] = []


def _plain(*tensors: Tensor) -> None:
    # A kernel can only launch on real tensors: the plain function must never see a traced (fake) one.
    for t in tensors:
        assert type(t) is torch.Tensor, f"kernel function called on a traced {type(t).__name__}"


def _cube(x: Tensor, scale: float) -> Tensor:
    _plain(x)
    calls.append("cube")
    return x * x * x * scale


def _cube_bwd(x: Tensor, dy: Tensor, scale: float) -> Tensor:
    _plain(x, dy)
    calls.append("cube_bwd")
    return 3 * x * x * scale * dy


cube_bwd = KernelCall("effarch_test::cube_bwd", _cube_bwd)
cube_bwd.op.register_fake(lambda x, dy, scale: torch.empty_like(x))
cube = KernelCall("effarch_test::cube", _cube)
cube.op.register_fake(lambda x, scale: torch.empty_like(x))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.scale = inputs[1]


def _backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return cube_bwd(x, dy, ctx.scale), None


cube.differentiable(_setup, _backward)


def test_eager_calls_run_the_plain_functions_with_their_gradient():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    calls.clear()
    y = cube(x, 2.0)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert calls == ["cube", "cube_bwd"]
    assert type(y.grad_fn).__name__.startswith("Eager_cube")  # an autograd.Function, not the custom op's
    torch.testing.assert_close(y, 2 * x**3)
    torch.testing.assert_close(g, 6 * x.detach() ** 2)
    assert torch.autograd.gradcheck(lambda t: cube(t, 0.5), (x,))


def test_without_gradients_no_autograd_node():
    x = torch.randn(4, dtype=torch.float64)
    y = cube(x, 1.0)
    assert y.grad_fn is None and torch.equal(y, x**3)
    with torch.no_grad():
        assert cube(x.requires_grad_(), 1.0).grad_fn is None


def test_compiled_code_calls_the_custom_ops():
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    y = torch.compile(lambda t: cube(t, 3.0), backend=backend, fullgraph=True)(x)
    assert any("effarch_test.cube" in s for s in seen)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, 9 * x.detach() ** 2)


def test_compiled_backward_traced_through_the_custom_ops():
    # AOT autograd traces the registered backward over fake tensors outside Dynamo (is_compiling() is False
    # there): the backward's kernel call must take its custom op, never the plain function.
    x = torch.randn(7, dtype=torch.float64, requires_grad=True)
    calls.clear()
    f = torch.compile(lambda t: cube(t, 1.5), backend="aot_eager", fullgraph=True)
    y = f(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, 1.5 * x.detach() ** 3)
    torch.testing.assert_close(g, 4.5 * x.detach() ** 2)
    assert calls == ["cube", "cube_bwd"]  # each ran once, on real tensors


def test_fake_tensors_take_the_custom_op():
    # Some PyTorch releases trace that backward with is_compiling() False: under a fake tensor mode alone the
    # call must still take the op (its fake implementation), never launch the plain function.
    from torch._subclasses.fake_tensor import FakeTensorMode

    calls.clear()
    with FakeTensorMode():
        x = torch.empty(4, 3, dtype=torch.float64)
        y = cube(x, 2.0)
        gx = cube_bwd(x, torch.empty_like(x), 2.0)
    assert calls == [] and y.shape == gx.shape == (4, 3)
