"""The fused causal short-convolution kernel (`effarch.ops.conv`) against the PyTorch form it replaces.

Random inputs and weights (no zeros), outputs poisoned before the kernels write them: y and the gradients of x,
weight and bias equal `effarch.layers.conv.short_conv` (+ SiLU) for dense batches and packed sequences, widths 1 to
4, channels and lengths that are not multiples of the blocks. Under the Triton interpreter without a GPU; on CUDA
also in bf16 against the float32 form. Dispatch: the layer takes the kernel only when switched on.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err, spy_launches
from triton_mode import CUDA, fresh_process_only, restore_environment, run_file_in_fresh_process  # noqa: F401

pytest.importorskip("triton")

from effarch.layers.conv import ShortConvolution, short_conv  # noqa: E402
from effarch.ops.conv import kernels  # noqa: E402
from effarch.ops.conv.kernels import causal_conv1d_triton, triton_supports  # noqa: E402

dispatch = importlib.import_module("effarch.ops.conv")
DEV = "cuda" if CUDA else "cpu"


def test_in_fresh_process():
    run_file_in_fresh_process(__file__)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(kernels, "POISON", True)


def reference(x, w, b, act, cu):
    y, _ = short_conv(x, w, b, cu_seqlens=cu)
    return F.silu(y) if act == "silu" else y


def grads(fn, x, w, b, seed=1):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b) if t is not None]
    y = fn(*leaves) if b is not None else fn(*leaves, None)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device, y.dtype)
    return [y, *torch.autograd.grad((y * dy).sum(), leaves)]


def make(B, T, C, W, bias, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, C, generator=g).to(DEV, dtype)
    w = torch.randn(C, W, generator=g).to(DEV, dtype)
    b = torch.randn(C, generator=g).to(DEV, dtype) if bias else None
    return x, w, b


@pytest.mark.skipif(CUDA, reason="interpreter tests; the CUDA test below covers the GPU")
@pytest.mark.parametrize(
    ("W", "bias", "act"), [(4, False, "silu"), (3, True, "silu"), (2, True, None), (1, False, None)]
)
def test_dense_batch_matches_pytorch(W, bias, act):
    x, w, b = make(2, 70, 80, W, bias)  # 70 tokens, 80 channels: partial blocks of 64
    assert triton_supports(x, w, act, None)
    ours = grads(lambda x, w, b: causal_conv1d_triton(x, w, b, act, None), x, w, b)
    ref = grads(lambda x, w, b: reference(x, w, b, act, None), x, w, b)
    for name, o, r in zip(("y", "dx", "dw", "db"), ours, ref):
        assert torch.isfinite(o).all(), f"{name} has values no kernel wrote"
        assert rel_err(o, r) < 1e-5, f"{name}: relative error {rel_err(o, r):.2e}"


@pytest.mark.skipif(CUDA, reason="interpreter tests; the CUDA test below covers the GPU")
@pytest.mark.parametrize("tile", [(16, 16), (32, 128)])
@pytest.mark.parametrize("packed", [False, True])
def test_other_tiles_give_the_same_results(tile, packed, monkeypatch):
    """The launch settings BT x BC (tokens x channels per program, timed by benchmarks/conv_ops.py --tiles): at
    16 x 16 (sequences and the weight gradient over many token blocks) and 32 x 128 (channels in one partial
    block) the kernels equal the PyTorch form, dense and packed."""
    monkeypatch.setattr(kernels, "BT", tile[0])
    monkeypatch.setattr(kernels, "BC", tile[1])
    cu = torch.tensor([0, 2, 50, 51, 90], device=DEV) if packed else None
    x, w, b = make(1 if packed else 2, 90 if packed else 70, 40, 4, True, seed=4)
    ours = grads(lambda x, w, b: causal_conv1d_triton(x, w, b, "silu", cu), x, w, b)
    ref = grads(lambda x, w, b: reference(x, w, b, "silu", cu), x, w, b)
    for name, o, r in zip(("y", "dx", "dw", "db"), ours, ref):
        assert rel_err(o, r) < 1e-5, f"{name}: relative error {rel_err(o, r):.2e}"


@pytest.mark.skipif(CUDA, reason="interpreter tests; the CUDA test below covers the GPU")
@pytest.mark.parametrize("dz_tile", [None, (16, 16), (32, 64), (16, 128)])
@pytest.mark.parametrize("packed", [False, True])
def test_dz_pass_at_its_own_tile(dz_tile, packed, monkeypatch):
    """The backward's dz pass at a tile of its own (DZ_TILE, timed by benchmarks/conv_ops.py --dz) beside the
    shipped tile of the other passes: more or fewer token blocks share the weight gradient, and the results equal
    the PyTorch form, dense and packed. None takes the other passes' tile."""
    monkeypatch.setattr(kernels, "DZ_TILE", dz_tile)
    blocks = []
    spy_launches(monkeypatch, kernels, "conv_dz_kernel", blocks.append, grid=True)
    cu = torch.tensor([0, 2, 50, 51, 90], device=DEV) if packed else None
    x, w, b = make(1 if packed else 2, 90 if packed else 70, 40, 4, True, seed=6)
    ours = grads(lambda x, w, b: causal_conv1d_triton(x, w, b, "silu", cu), x, w, b)
    ref = grads(lambda x, w, b: reference(x, w, b, "silu", cu), x, w, b)
    T, (bt, bc) = x.shape[1], dz_tile or (kernels.BT, kernels.BC)
    assert blocks == [(-(-T // bt), -(-40 // bc), x.shape[0])]
    for name, o, r in zip(("y", "dx", "dw", "db"), ours, ref):
        assert rel_err(o, r) < 1e-5, f"{name}: relative error {rel_err(o, r):.2e}"


@pytest.mark.skipif(CUDA, reason="interpreter tests; the CUDA test below covers the GPU")
@pytest.mark.parametrize("bias", [False, True])
def test_packed_sequences_do_not_see_each_other(bias):
    cu = torch.tensor([0, 2, 50, 51, 90], device=DEV)  # a 1-token document and one shorter than the width
    x, w, b = make(1, 90, 40, 4, bias, seed=3)
    ours = grads(lambda x, w, b: causal_conv1d_triton(x, w, b, "silu", cu), x, w, b)
    ref = grads(lambda x, w, b: reference(x, w, b, "silu", cu), x, w, b)
    for name, o, r in zip(("y", "dx", "dw", "db"), ours, ref):
        assert rel_err(o, r) < 1e-5, f"{name}: relative error {rel_err(o, r):.2e}"
    # a document's first output reads only its own token
    y = causal_conv1d_triton(x, w, b, None, cu)
    first = x[0, 50] * w[:, -1] + (b if b is not None else 0)
    assert torch.allclose(y[0, 50], first, atol=1e-6)


def test_layer_tails_from_a_fresh_start():
    """The tail a fresh call hands on is the last W-1 inputs after zeros, for empty, short and long inputs, with and
    without gradients (without, a copy rather than a view of the input); continuing from it equals one call over
    the whole sequence."""
    torch.manual_seed(1)
    conv = ShortConvolution(8, 4)
    x = torch.randn(2, 7, 8)
    for T in (0, 2, 7):
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                y, tail = conv(x[:, :T])
            assert y.shape == (2, T, 8) and tail.shape == (2, 3, 8)
            expect = torch.cat([torch.zeros(2, 3, 8), x[:, :T]], dim=1)[:, -3:]
            assert torch.equal(tail, expect)
            # a stored state must not keep the whole input alive through a view
            assert grad or tail.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
    with torch.no_grad():
        whole, _ = conv(x)
        first, tail = conv(x[:, :4])
        rest, _ = conv(x[:, 4:], tail)
    assert torch.allclose(torch.cat([first, rest], dim=1), whole, atol=1e-6)


def test_supports():
    x, w, _ = make(2, 8, 16, 4, False)
    assert not triton_supports(x, w, "gelu", None)
    assert not triton_supports(x, torch.randn(16, 9, device=DEV), "silu", None)
    assert not triton_supports(x, w, "silu", torch.tensor([0, 4, 8], device=DEV))  # packed needs B = 1
    assert not triton_supports(x.double(), w.double(), "silu", None)


@pytest.mark.skipif(CUDA, reason="interpreter tests")
def test_layer_uses_the_kernel_only_when_switched_on(monkeypatch):
    """ShortConvolution's training path goes through the dispatcher: kernel on (here forced past the device
    check) gives the PyTorch path's values and gradients; off, the kernel is never called."""
    torch.manual_seed(0)
    conv = ShortConvolution(24, 4)
    x = torch.randn(2, 33, 24)
    calls = []
    real = dispatch._load()

    def counted(*args):
        calls.append(1)
        return real[0](*args)

    monkeypatch.setattr(dispatch, "_triton", (counted, real[1]))
    monkeypatch.setattr(dispatch, "_on_gpu", lambda t: True)
    dy = torch.randn(2, 33, 24)

    def run():
        xl = x.clone().requires_grad_()
        y = conv(xl)[0]
        return [y, *torch.autograd.grad((y * dy).sum(), (xl, conv.weight))]

    monkeypatch.setattr(dispatch, "AUTO_TRITON", False)
    ref = run()
    assert not calls
    monkeypatch.setattr(dispatch, "AUTO_TRITON", True)
    ours = run()
    assert calls
    for o, r in zip(ours, ref):
        assert rel_err(o, r) < 1e-5


@pytest.mark.skipif(CUDA, reason="interpreter tests")
@pytest.mark.parametrize(("packed", "kernel"), [(False, False), (True, False), (False, "joined"), (True, "joined"),
                                                (False, "apart"), (True, "apart")])  # fmt: skip
def test_joined_convolutions_equal_each_one_alone(packed, kernel, monkeypatch):
    """`joined_fresh_conv`: three convolutions of 8, 8 and 16 channels over their inputs side by side give each one's
    output, tail and gradients (input, weights, biases) of running it alone, dense and packed, on the PyTorch path
    and on the kernel (one launch each way for the three): with channel blocks wider than the convolutions (outputs
    are views of one) and with blocks of 8 channels (the kernel writes three contiguous outputs and reads their
    gradients apart); `joinable` refuses a mismatched width or activation."""
    from effarch.layers.conv import joinable, joined_fresh_conv

    if kernel == "apart":
        monkeypatch.setattr(kernels, "SPLIT_OUTPUTS", True)
        monkeypatch.setattr(kernels, "BC", 8)
        monkeypatch.setattr(kernels, "DZ_TILE", (16, 8))
    monkeypatch.setattr(dispatch, "_on_gpu", lambda t: bool(kernel))
    launches = []
    real = dispatch._load()
    monkeypatch.setattr(dispatch, "_triton", (lambda *a: launches.append(1) or real[0](*a), real[1]))
    torch.manual_seed(3)
    convs = [ShortConvolution(c, 4, bias=True) for c in (8, 8, 16)]
    for c in convs:
        with torch.no_grad():
            c.bias.normal_()
    B, T = (1, 45) if packed else (2, 21)
    cu = torch.tensor([0, 7, 7, 30, 45]) if packed else None
    x = torch.randn(B, T, 32, requires_grad=True)
    dy = torch.randn(B, T, 32)
    params = [p for c in convs for p in (c.weight, c.bias)]
    ys, tails = joined_fresh_conv(convs, x, cu)
    assert [t.shape[-1] for t in ys] == [8, 8, 16]
    apart = all(t.is_contiguous() for t in ys) and len({t.untyped_storage().data_ptr() for t in ys}) == 3
    assert apart == (kernel == "apart")
    y = torch.cat(ys, dim=-1)
    joined = [y, *tails, *torch.autograd.grad((y * dy).sum(), [x, *params])]
    assert len(launches) == (1 if kernel else 0)  # the forward's; the backward's is the custom op's own
    parts = x.split([8, 8, 16], dim=-1)
    ys, alone_tails = zip(*(c(p, cu_seqlens=cu) for c, p in zip(convs, parts, strict=True)), strict=True)
    y1 = torch.cat(ys, dim=-1)
    alone = [y1, *alone_tails, *torch.autograd.grad((y1 * dy).sum(), [x, *params])]
    for a, b in zip(joined, alone, strict=True):
        assert a.shape == b.shape and rel_err(a, b) < 1e-6
    assert joinable(convs)
    assert not joinable([convs[0], ShortConvolution(8, 3, bias=True)])
    assert not joinable([convs[0], ShortConvolution(8, 4, bias=True, activation=None)])
    assert not joinable([convs[0], ShortConvolution(8, 4)])  # one without a bias


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize(
    "tile",
    [(64, 64), (32, 128), (64, 128), (128, 64), (32, 256), (64, 64, 32, 64, 4), (64, 64, 16, 64, 2),
     (64, 64, 32, 32, 2), (64, 64, 16, 64, 1), (64, 64, 16, 128, 4)],
)  # fmt: skip
def test_cuda_bf16_matches_float32(packed, tile, monkeypatch):
    """bf16 against the float32 PyTorch form, at the shipped tile and those conv_ops.py --tiles times, and at the
    dz pass's tiles and warps that --dz times (BT, BC, dz tokens, dz channels, dz warps)."""
    monkeypatch.setattr(kernels, "BT", tile[0])
    monkeypatch.setattr(kernels, "BC", tile[1])
    if len(tile) > 2:
        monkeypatch.setattr(kernels, "DZ_TILE", tile[2:4])
        monkeypatch.setattr(kernels, "DZ_WARPS", tile[4])
    x, w, b = make(1 if packed else 4, 2000, 768, 4, True, dtype=torch.bfloat16, seed=5)
    cu = torch.tensor([0, 700, 701, 2000], device=DEV) if packed else None
    ours = grads(lambda x, w, b: causal_conv1d_triton(x, w, b, "silu", cu), x, w, b)
    ref = grads(lambda x, w, b: reference(x, w, b, "silu", cu), x.float(), w.float(), b.float())
    for name, o, r in zip(("y", "dx", "dw", "db"), ours, ref):
        assert rel_err(o.float(), r) < 1e-2, f"{name}: relative error {rel_err(o.float(), r):.2e}"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_cuda_outputs_written_apart(packed, bias, monkeypatch):
    """bf16 outputs written apart (three contiguous tensors of 256, 128 and 384 channels; the compiled kernels'
    branch by channel block) against the float32 PyTorch form, gradients of each output read where they are."""
    monkeypatch.setattr(kernels, "SPLIT_OUTPUTS", True)
    x, w, b = make(1 if packed else 4, 2000, 768, 4, bias, dtype=torch.bfloat16, seed=6)
    cu = torch.tensor([0, 700, 701, 2000], device=DEV) if packed else None
    splits = (256, 128, 384)
    assert kernels.splitable(splits)

    def apart(x, w, b):
        ys = causal_conv1d_triton(x, w, b, "silu", cu, splits)
        assert all(t.is_contiguous() for t in ys) and [t.shape[-1] for t in ys] == list(splits)
        return torch.cat(ys, dim=-1)

    ours = grads(apart, x, w, b)
    ref = grads(lambda x, w, b: reference(x, w, b, "silu", cu), x.float(), w.float(), None if b is None else b.float())
    for name, o, r in zip(("y", "dx", "dw", "db"), ours, ref):
        assert rel_err(o.float(), r) < 1e-2, f"{name}: relative error {rel_err(o.float(), r):.2e}"


def test_conv_ops_fake_implementations_match(monkeypatch):
    """The convolution's custom ops, joined (with a bias) and written apart (without), forward and backward: their
    fake implementations (what torch.compile traces) give the real outputs' shapes, dtypes and strides (a model
    compiled through the split ops: test_fused_wiring.py)."""
    monkeypatch.setattr(kernels, "BC", 8)  # channel blocks that divide the three widths below
    monkeypatch.setattr(kernels, "DZ_TILE", (16, 8))
    g = torch.Generator().manual_seed(7)
    x, dy = (torch.randn(2, 19, 32, generator=g).to(DEV) for _ in range(2))
    w = torch.randn(32, 4, generator=g).to(DEV)
    b = torch.randn(32, generator=g).to(DEV)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(kernels.conv_fwd_op, (x, w, b, None, True), test_utils=utils)
    torch.library.opcheck(kernels.conv_bwd_op, (dy, x, w, b, None, True), test_utils=utils)
    torch.library.opcheck(kernels.conv_fwd_split_op_call.op, (x, w, None, None, True, 8, 8), test_utils=utils)
    dys = (dy[..., :8].contiguous(), dy[..., 8:16].contiguous(), dy[..., 16:].contiguous())
    torch.library.opcheck(kernels.conv_bwd_split_op_call.op, (*dys, x, w, None, None, True, 8, 8), test_utils=utils)
