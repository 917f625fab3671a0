"""Fused Triton training parts (RMSNorm + residual, SwiGLU, rotary) against their PyTorch references.

On a machine without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1) at tiny shapes,
float32: outputs and every gradient within rel 1e-5 of the reference, with last dimensions that are not
powers of two. Every buffer the kernels fill starts as NaN (fused.POISON), so an element no kernel wrote
fails. On CUDA: bfloat16 within rel 1e-2 of the float32 reference as well.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err, spy_launches
from triton_mode import CUDA, fresh_process_only, restore_environment, run_file_in_fresh_process  # noqa: F401

pytest.importorskip("triton")

from effarch.layers.norm import rms_norm as layer_rms_norm  # noqa: E402
from effarch.ops import fused  # noqa: E402
from effarch.ops.fused import (  # noqa: E402
    apply_rotary,
    apply_rotary_reference,
    delta_gates,
    delta_gates_reference,
    gated_rms_norm,
    gated_rms_norm_reference,
    log_sigmoid_decay,
    log_sigmoid_decay_reference,
    rms_norm,
    rms_norm_reference,
    ssd_inputs,
    ssd_inputs_reference,
    swiglu,
    swiglu_packed,
    swiglu_reference,
)

DEV = "cuda" if CUDA else "cpu"
TOL = 1e-5


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(fused, "POISON", True)


def test_in_fresh_process():
    run_file_in_fresh_process(__file__)


def _randn(*shape, seed, dtype=torch.float32, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEV, dtype).requires_grad_(grad)


def _grads(outs, inputs, seed):
    """Gradients of a random linear function of `outs` with respect to the `inputs` that require them."""
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed + 1000)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(DEV)).sum() for o in outs)
    ins = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(loss, ins)


def _check(outs, refs, inputs, seed, tol=TOL):
    outs_t = outs if isinstance(outs, tuple) else (outs,)
    refs_t = refs if isinstance(refs, tuple) else (refs,)
    for o, r in zip(outs_t, refs_t, strict=True):
        assert o.dtype == r.dtype and o.shape == r.shape
        assert rel_err(o, r) < tol
    for go, gr in zip(_grads(outs, inputs, seed), _grads(refs, inputs, seed), strict=True):
        assert torch.isfinite(go).all()
        assert rel_err(go, gr) < tol


# RMSNorm --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 12), (2, 5, 40), (4, 100), (2, 3000)])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_matches_reference(shape, with_residual, with_weight):
    x = _randn(*shape, seed=0)
    w = _randn(shape[-1], seed=1) if with_weight else None
    r = _randn(*shape, seed=2) if with_residual else None
    out = rms_norm(x, w, 1e-6, r, backend="triton")
    ref = rms_norm_reference(x, w, 1e-6, r)
    _check(out, ref, (x, w, r), seed=3)


@pytest.mark.parametrize("programs", [4, 3])
def test_rms_norm_backward_several_rows_per_program(monkeypatch, programs):
    # 10 rows over 4 programs: 3 rows each and a last program with 1 row past the end.
    module = sys.modules["effarch.ops.fused.norm"]
    monkeypatch.setattr(module, "BWD_PROGRAMS", programs)
    x, w, r = _randn(10, 36, seed=0), _randn(36, seed=1), _randn(10, 36, seed=2)
    _check(rms_norm(x, w, 1e-6, r, backend="triton"), rms_norm_reference(x, w, 1e-6, r), (x, w, r), seed=3)


@pytest.mark.parametrize("tile", [512, 4096])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("programs", [1024, 5])
def test_rms_norm_several_rows_per_program(monkeypatch, tile, with_residual, programs):
    """norm.FWD_TILE / BWD_TILE: rows of 40 channels (blocks of 64) 8 or 64 at a time over 37 rows, in the forward
    the last program partly past the end, in the backward runs of 8 rows (5 programs, the last short) or of 1:
    equal to the reference, values and gradients (d weight summed across programs)."""
    module = sys.modules["effarch.ops.fused.norm"]
    monkeypatch.setattr(module, "FWD_TILE", tile)
    monkeypatch.setattr(module, "BWD_TILE", tile)
    monkeypatch.setattr(module, "BWD_PROGRAMS", programs)
    x, w = _randn(37, 40, seed=0), _randn(40, seed=1)
    r = _randn(37, 40, seed=2) if with_residual else None
    _check(rms_norm(x, w, 1e-6, r, backend="triton"), rms_norm_reference(x, w, 1e-6, r), (x, w, r), seed=3)


@pytest.mark.parametrize("D", [40, 512, 600])
def test_rms_norm_packs_short_rows_only(monkeypatch, D):
    """Rows of at most PACKED_MAX_D channels go FWD_TILE / block to a forward program and BWD_TILE / block at a time
    in the backward; wider rows one at a time (their blocks packed cost time on an H200). Values stay those of the
    reference either way."""
    module = sys.modules["effarch.ops.fused.norm"]
    monkeypatch.setattr(module, "FWD_TILE", 4096)
    monkeypatch.setattr(module, "BWD_TILE", 2048)
    rows = []
    spy_launches(monkeypatch, module, "_rms_fwd", lambda kw: rows.append(kw["ROWS"]), keywords=True)
    spy_launches(monkeypatch, module, "_rms_bwd", lambda kw: rows.append(kw["ROWS"]), keywords=True)
    x, w = _randn(9, D, seed=0), _randn(D, seed=1)
    _check(rms_norm(x, w, 1e-6, None, backend="triton"), rms_norm_reference(x, w, 1e-6, None), (x, w), seed=3)
    block = 1 << (D - 1).bit_length()
    assert rows == ([4096 // block, 2048 // block] if block <= module.PACKED_MAX_D else [1, 1])


@pytest.mark.parametrize("used", ["y", "sum"])
def test_rms_norm_gradient_through_one_output_alone(used):
    """With a residual, a loss of y alone or of the new residual stream alone: the other output's gradient (and
    rstd's) arrives as None, no zero tensor is made for it in the backward, and the gradients equal the reference's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Zeros(TorchDispatchMode):
        made = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.made += func.overloadpacket.__name__ in ("zeros", "zeros_like", "new_zeros") and used == "y"
            return func(*args, **(kwargs or {}))

    grads = []
    for fn in (lambda *a: rms_norm(*a, backend="triton"), rms_norm_reference):
        x, w, r = (_randn(*shape, seed=i).requires_grad_() for i, shape in enumerate(((6, 40), (40,), (6, 40))))
        y, s = fn(x, w, 1e-6, r)
        out = y if used == "y" else s
        loss = (out.float() * _randn(6, 40, seed=7, grad=False).float()).sum()
        with Zeros() as zeros:
            got = torch.autograd.grad(loss, (x, w, r), allow_unused=True)  # w does not reach the sum
        assert zeros.made == 0
        grads.append([torch.zeros_like(t) if g is None else g for g, t in zip(got, (x, w, r))])
    for a, b in zip(*grads):
        assert rel_err(a, b) < TOL


def test_rms_norm_constant_weight_takes_no_weight_gradient(monkeypatch):
    """A weight that needs no gradient (unit_heads' constant D^-1/2) is read but its gradient is neither
    accumulated nor summed; x's gradient equals the reference's."""
    module = sys.modules["effarch.ops.fused.norm"]
    flags = []
    spy_launches(monkeypatch, module, "_rms_bwd", lambda kw: flags.append(kw["WANT_DW"]), keywords=True)
    x, w = _randn(7, 40, seed=0), _randn(40, seed=1, grad=False)
    _check(rms_norm(x, w, 1e-6, backend="triton"), rms_norm_reference(x, w, 1e-6), (x,), seed=3)
    assert flags == [False]


def test_rms_norm_residual_without_grad():
    x, w = _randn(5, 24, seed=0), _randn(24, seed=1)
    r = _randn(5, 24, seed=2, grad=False)
    _check(rms_norm(x, w, 1e-5, r, backend="triton"), rms_norm_reference(x, w, 1e-5, r), (x, w), seed=4)


def test_rms_norm_reference_is_the_layer_norm():
    x, w = _randn(3, 7, 20, seed=0, grad=False), _randn(20, seed=1, grad=False)
    r = _randn(3, 7, 20, seed=2, grad=False)
    y, s = rms_norm_reference(x, w, 1e-6, r)
    with fused.use_fused(False):  # on CUDA the layer would otherwise take the kernel
        assert torch.equal(rms_norm_reference(x, w, 1e-6), layer_rms_norm(x, w, 1e-6))
        assert torch.equal(s, x + r) and torch.equal(y, layer_rms_norm(x + r, w, 1e-6))


# SwiGLU ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7,), (3, 5, 13), (2, 1100)])
def test_swiglu_matches_reference(shape):
    a, b = _randn(*shape, seed=0), _randn(*shape, seed=1)
    _check(swiglu(a, b, backend="triton"), swiglu_reference(a, b), (a, b), seed=2)


@pytest.mark.parametrize("shape", [(5, 26), (2, 3, 2200)])
def test_swiglu_packed_matches_reference(shape):
    # a and b side by side in one tensor, as one W1|W3 matmul produces them; H = 1100 spans two programs.
    ab = _randn(*shape, seed=0)
    _check(swiglu_packed(ab, backend="triton"), swiglu_reference(*ab.chunk(2, dim=-1)), (ab,), seed=1)


def test_swiglu_reads_strided_halves_in_place():
    ab = _randn(3, 4, 18, seed=0)
    a, b = ab.chunk(2, dim=-1)  # views with row stride 18
    _check(swiglu(a, b, backend="triton"), swiglu_reference(a, b), (ab,), seed=1)


def test_swiglu_reference_is_the_definition():
    a, b = _randn(4, 9, seed=0, dtype=torch.float64), _randn(4, 9, seed=1, dtype=torch.float64)
    assert rel_err(swiglu_reference(a, b), a * torch.sigmoid(a) * b) < 1e-14


# Log-sigmoid decay ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7,), (3, 5, 13), (2, 2100)])
@pytest.mark.parametrize("normalizer", [16.0, 3.0])
def test_log_sigmoid_decay_matches_reference(shape, normalizer):
    """Values from -60 to 60 (exp(-|x|) far below float32's epsilon at the ends); 4200 elements span programs."""
    x = (_randn(*shape, seed=0, grad=False) * 20).requires_grad_()
    _check(log_sigmoid_decay(x, normalizer, backend="triton"), log_sigmoid_decay_reference(x, normalizer), (x,), seed=1)


def test_log_sigmoid_decay_in_bf16_and_its_errors():
    """bf16 in, float32 out, the gradient in bf16; a zero normalizer is refused in one sentence."""
    x = _randn(4, 300, seed=0, dtype=torch.bfloat16)
    y = log_sigmoid_decay(x, 16.0, backend="triton")
    assert y.dtype == torch.float32
    xr = x.detach().float().requires_grad_()
    assert rel_err(y, log_sigmoid_decay_reference(xr, 16.0)) < 1e-6
    (gx,) = _grads(y, (x,), seed=2)
    (gr,) = _grads(log_sigmoid_decay_reference(xr, 16.0), (xr,), seed=2)
    assert gx.dtype == torch.bfloat16 and rel_err(gx.float(), gr) < 1e-2
    with pytest.raises(ValueError, match="normalizer must be nonzero"):
        log_sigmoid_decay(x, 0.0)


def test_log_sigmoid_decay_reference_is_the_definition():
    x = _randn(4, 9, seed=0, dtype=torch.float64, grad=False) * 10
    assert rel_err(log_sigmoid_decay_reference(x, 16.0), torch.log(torch.sigmoid(x)) / 16) < 1e-12


# Gated DeltaNet's gates -------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 6), (2, 700, 6), (1, 3, 5, 17)])
@pytest.mark.parametrize("beta_scale", [1.0, 2.0])
def test_delta_gates_match_reference(shape, beta_scale):
    """Pre-activations from -40 to 40 (softplus's exp far below float32's epsilon at the ends), several programs
    (1,400 rows of 6 heads: 11 programs), heads not a power of two: values and the gradients of a, b, A_log and dt_bias (the last
    two summed over every row's program)."""
    H = shape[-1]
    ab = (_randn(*shape[:-1], 2 * H, seed=0, grad=False) * 15).requires_grad_()
    A_log, dt_bias = _randn(H, seed=2), _randn(H, seed=3)
    inputs = (ab, A_log, dt_bias)
    _check(delta_gates(*inputs, beta_scale, backend="triton"), delta_gates_reference(*inputs, beta_scale), inputs, 4)


@pytest.mark.parametrize("used", ["g", "beta"])
def test_delta_gates_gradient_through_one_gate_alone(used):
    """A loss of one gate alone: the other's gradient arrives as None and its inputs' gradients are zero."""
    grads = []
    for fn in (lambda *x: delta_gates(*x, backend="triton"), delta_gates_reference):
        inputs = (_randn(40, 12, seed=0), _randn(6, seed=2), _randn(6, seed=3))
        g, beta = fn(*inputs)
        loss = ((g if used == "g" else beta) * _randn(40, 6, seed=5, grad=False)).sum()
        got = torch.autograd.grad(loss, inputs, allow_unused=True)
        grads.append([torch.zeros_like(x) if d is None else d for d, x in zip(got, inputs)])
    for ours, ref in zip(*grads):
        assert torch.isfinite(ours).all() and (rel_err(ours, ref) < TOL if ref.any() else not ours.any())
    dab = grads[0][0]
    assert not dab[:, (6 if used == "g" else 0) :][:, :6].any()  # the unused gate's half of ab


def test_delta_gates_in_bf16_and_their_errors():
    """bf16 pre-activations and parameters in, float32 gates out, gradients in the inputs' dtypes; mismatched
    shapes are refused in one sentence."""
    ab = _randn(64, 12, seed=0, dtype=torch.bfloat16)
    A_log, dt_bias = _randn(6, seed=2, dtype=torch.bfloat16), _randn(6, seed=3, dtype=torch.bfloat16)
    g, beta = delta_gates(ab, A_log, dt_bias, backend="triton")
    assert g.dtype == beta.dtype == torch.float32 and g.shape == beta.shape == (64, 6)
    ref = [x.detach().float().requires_grad_() for x in (ab, A_log, dt_bias)]
    g_ref, beta_ref = delta_gates_reference(*ref)
    assert rel_err(g, g_ref) < 1e-5 and rel_err(beta, beta_ref) < 1e-6
    ours = _grads((g, beta), (ab, A_log, dt_bias), seed=4)
    theirs = _grads((g_ref, beta_ref), ref, seed=4)
    for x, d, r in zip((ab, A_log, dt_bias), ours, theirs):
        assert d.dtype == x.dtype and rel_err(d.float(), r) < 1e-2
    with pytest.raises(ValueError, match=r"ab \[\.\.\., 2H\]"):
        delta_gates(ab[:, :11], A_log, dt_bias)


def test_delta_gates_reference_is_the_layer_formula():
    a, b = _randn(4, 3, seed=0, dtype=torch.float64, grad=False), _randn(4, 3, seed=1, dtype=torch.float64, grad=False)
    A_log, dt_bias = (
        _randn(3, seed=2, dtype=torch.float64, grad=False),
        _randn(3, seed=3, dtype=torch.float64, grad=False),
    )
    g, beta = delta_gates_reference(torch.cat([a, b], -1), A_log, dt_bias, 2.0)
    assert rel_err(g, -A_log.exp() * torch.log1p(torch.exp(a + dt_bias))) < 1e-12
    assert rel_err(beta, 2 / (1 + torch.exp(-b))) < 1e-12


# Mamba-2's step, decay and scaled values -------------------------------------------------------------------


@pytest.mark.parametrize(("N", "H", "P"), [(3, 2, 16), (700, 6, 24), (5, 3, 5)])
def test_ssd_inputs_match_reference(N, H, P):
    """dt as a slice of a wider projection (its row stride 3H + 1, as Mamba-2 takes it), pre-activations from -40
    to 40 (softplus's ends), several programs (700 x 6 pairs of 24 channels: 50 programs), heads and channels not
    powers of two: both outputs and the gradients of dt, x, A_log and dt_bias (the last two summed over tokens)."""
    wide = (_randn(2, N, 3 * H + 1, seed=0, grad=False) * 15).requires_grad_()
    dt = wide[..., 1 : H + 1]
    x = _randn(2, N, H, P, seed=1)
    A_log, dt_bias = _randn(H, seed=2), _randn(H, seed=3)
    args = (dt, x, A_log, dt_bias)
    _check(ssd_inputs(*args, backend="triton"), ssd_inputs_reference(*args), (wide, x, A_log, dt_bias), 4)


@pytest.mark.parametrize("used", ["log_decay", "v"])
def test_ssd_inputs_gradient_through_one_output_alone(used):
    """A loss of one output alone: the other's gradient arrives as None; dx is zero without v's."""
    grads = []
    for fn in (lambda *a: ssd_inputs(*a, backend="triton"), ssd_inputs_reference):
        inputs = (_randn(9, 4, seed=0), _randn(9, 4, 8, seed=1), _randn(4, seed=2), _randn(4, seed=3))
        log_decay, v = fn(*inputs)
        out = log_decay if used == "log_decay" else v
        loss = (out * _randn(*out.shape, seed=5, grad=False)).sum()
        got = torch.autograd.grad(loss, inputs, allow_unused=True)
        grads.append([torch.zeros_like(t) if d is None else d for d, t in zip(got, inputs)])
    for ours, ref in zip(*grads):
        assert torch.isfinite(ours).all() and (rel_err(ours, ref) < TOL if ref.any() else not ours.any())


def test_ssd_inputs_in_bf16_and_their_errors():
    """bf16 inputs and parameters: float32 log decay, bf16 values (x's dtype), gradients in the inputs' dtypes;
    mismatched shapes are refused in one sentence."""
    dt, x = _randn(2, 32, 4, seed=0, dtype=torch.bfloat16), _randn(2, 32, 4, 16, seed=1, dtype=torch.bfloat16)
    A_log, dt_bias = _randn(4, seed=2, dtype=torch.bfloat16), _randn(4, seed=3, dtype=torch.bfloat16)
    log_decay, v = ssd_inputs(dt, x, A_log, dt_bias, backend="triton")
    assert log_decay.dtype == torch.float32 and v.dtype == torch.bfloat16
    ref = [t.detach().float().requires_grad_() for t in (dt, x, A_log, dt_bias)]
    ld_ref, v_ref = ssd_inputs_reference(*ref)
    assert rel_err(log_decay, ld_ref) < 1e-5 and rel_err(v.float(), v_ref) < 1e-2
    ours = _grads((log_decay, v), (dt, x, A_log, dt_bias), seed=4)
    theirs = _grads((ld_ref, v_ref), ref, seed=4)
    for t, d, r in zip((dt, x, A_log, dt_bias), ours, theirs):
        assert d.dtype == t.dtype and rel_err(d.float(), r) < 1e-2
    with pytest.raises(ValueError, match=r"dt \[\.\.\., H\] and x \[\.\.\., H, P\]"):
        ssd_inputs(dt[..., :3], x, A_log, dt_bias)


def test_ssd_inputs_ops_fake_implementations_match():
    """The custom ops' fake implementations (what torch.compile traces) give the real outputs' shapes, dtypes and
    strides, a strided dt included; the backward's with either gradient missing."""
    mod = sys.modules["effarch.ops.fused.ssd_inputs"]  # loaded with `ssd_inputs`, imported above
    wide = _randn(6, 9, seed=0, grad=False)
    dt, x = wide[:, 2:6], _randn(6, 4, 8, seed=1, grad=False)
    A_log, dt_bias = _randn(4, seed=2, grad=False), _randn(4, seed=3, grad=False)
    utils = ("test_schema", "test_faketensor")
    torch.library.opcheck(mod._fwd_op, (dt, x, A_log, dt_bias), test_utils=utils)
    dl, dv = _randn(6, 4, seed=4, grad=False), _randn(6, 4, 8, seed=5, grad=False)
    for grads in ((dl, dv), (None, dv), (dl, None)):
        torch.library.opcheck(mod._bwd_op, (dt, x, A_log, dt_bias, *grads), test_utils=utils)


def test_ssd_inputs_reference_is_the_layer_formula():
    dt, x = (
        _randn(4, 3, seed=0, dtype=torch.float64, grad=False),
        _randn(4, 3, 5, seed=1, dtype=torch.float64, grad=False),
    )
    A_log, dt_bias = (
        _randn(3, seed=2, dtype=torch.float64, grad=False),
        _randn(3, seed=3, dtype=torch.float64, grad=False),
    )
    log_decay, v = ssd_inputs_reference(dt, x, A_log, dt_bias)
    step = torch.log1p(torch.exp(dt + dt_bias))
    assert rel_err(log_decay, -A_log.exp() * step) < 1e-12 and rel_err(v, x * step[..., None]) < 1e-12


# Rotary ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B,T,H,D", [(2, 5, 3, 10), (1, 7, 4, 24), (2, 3, 1, 6)])
@pytest.mark.parametrize("per_batch", [False, True])
def test_rotary_matches_reference(B, T, H, D, per_batch):
    x = _randn(B, T, H, D, seed=0)
    angles = _randn(*((B,) if per_batch else ()), T, D // 2, seed=1, grad=False) * 3
    cos, sin = angles.cos(), angles.sin()
    _check(apply_rotary(x, cos, sin, backend="triton"), apply_rotary_reference(x, cos, sin), (x,), seed=2)


@pytest.mark.parametrize("per_batch", [False, True])
def test_rotary_table_gradients(per_batch):
    x = _randn(2, 4, 3, 8, seed=0)
    cos = _randn(*((2,) if per_batch else ()), 4, 4, seed=1)
    sin = _randn(*((2,) if per_batch else ()), 4, 4, seed=2)
    _check(apply_rotary(x, cos, sin, backend="triton"), apply_rotary_reference(x, cos, sin), (x, cos, sin), seed=3)


def test_rotary_reads_strided_slices():
    # k out of a joint kv projection [B, T, 2, H, D], and the first 6 of 10 channels (partial rotary).
    kv = _randn(2, 5, 2, 3, 10, seed=0)
    angles = _randn(5, 5, seed=1, grad=False)
    k = kv.unbind(2)[1]
    _check(apply_rotary(k, angles.cos(), angles.sin(), backend="triton"),
           apply_rotary_reference(k, angles.cos(), angles.sin()), (kv,), seed=2)  # fmt: skip
    part = k[..., :6]
    cos, sin = angles[:, :3].cos(), angles[:, :3].sin()
    _check(apply_rotary(part, cos, sin, backend="triton"), apply_rotary_reference(part, cos, sin), (kv,), seed=3)


def test_rotary_backward_is_the_inverse_rotation():
    x = _randn(1, 6, 2, 10, seed=0)
    angles = _randn(6, 5, seed=1, grad=False)
    y = apply_rotary(x, angles.cos(), angles.sin(), backend="triton")
    (dx,) = torch.autograd.grad(y, x, y.detach())  # J^T y = R(-angle) R(angle) x = x
    assert rel_err(dx, x) < TOL


# Backend choice and input checks ---------------------------------------------------------------------------


def test_auto_backend():
    x, w = _randn(3, 10, seed=0, grad=False), _randn(10, seed=1, grad=False)
    out = rms_norm(x, w, 1e-6)  # CPU tensors -> the reference; CUDA tensors -> the kernel
    assert rel_err(out, rms_norm_reference(x, w, 1e-6)) < TOL
    assert fused.use_triton("auto", x) == (CUDA and fused.HAS_TRITON)
    x64 = x.double()
    assert not fused.use_triton("auto", x64)
    assert torch.equal(swiglu(x64, x64), swiglu_reference(x64, x64))


def test_bad_inputs():
    x = _randn(2, 3, 4, 6, seed=0, grad=False)
    with pytest.raises(ValueError, match="backend"):
        swiglu(x, x, backend="fast")
    with pytest.raises(ValueError, match="dtypes"):
        swiglu(x.double(), x.double(), backend="triton")
    with pytest.raises(ValueError, match="b has shape"):
        swiglu(x, x[0], backend="triton")
    with pytest.raises(ValueError, match="last dimension must be even"):
        swiglu_packed(x[..., :5], backend="triton")
    with pytest.raises(ValueError, match="weight has shape"):
        rms_norm(x, torch.ones(5, device=DEV), 1e-6)
    with pytest.raises(ValueError, match="residual has shape"):
        rms_norm(x, None, 1e-6, x[0])
    with pytest.raises(ValueError, match="cos has shape"):
        apply_rotary(x, torch.ones(4, 2, device=DEV), torch.ones(4, 2, device=DEV))
    with pytest.raises(ValueError, match="D even"):
        apply_rotary(x[..., :5], torch.ones(3, 2, device=DEV), torch.ones(3, 2, device=DEV))


@pytest.mark.parametrize("gate_first", [False, True])
@pytest.mark.parametrize("activation", ["silu", "sigmoid"])
@pytest.mark.parametrize("shape", [(2, 5, 3, 24), (7, 100), (1, 1, 1, 16)])
def test_gated_rms_norm_matches_reference(shape, activation, gate_first):
    """Rows of 24 and 100 channels (not powers of two), several rows per program and a partial last tile."""
    o, g, w = _randn(*shape, seed=0), _randn(*shape, seed=1), _randn(shape[-1], seed=2)
    out = gated_rms_norm(o, w, g, 1e-6, activation, gate_first=gate_first, backend="triton")
    _check(out, gated_rms_norm_reference(o, w, g, 1e-6, activation, gate_first), (o, w, g), seed=3)


@pytest.mark.parametrize("gate_first", [False, True])
@pytest.mark.parametrize("programs", [1, 3])
def test_gated_rms_norm_backward_several_runs_per_program(monkeypatch, programs, gate_first):
    """The backward walks runs of rows per program (each run several tiles of rows) and sums d weight partials."""
    gn = sys.modules["effarch.ops.fused.gated_norm"]
    monkeypatch.setattr(gn, "BWD_PROGRAMS", programs)
    o, g, w = _randn(45, 40, seed=4), _randn(45, 40, seed=5), _randn(40, seed=6)
    out = gated_rms_norm(o, w, g, 1e-5, gate_first=gate_first, backend="triton")
    _check(out, gated_rms_norm_reference(o, w, g, 1e-5, gate_first=gate_first), (o, w, g), seed=7)


def test_gated_rms_norm_reference_is_the_layer_chain():
    """The reference is HeadNorm("rms") then the SiLU gate, in float32."""
    o, g, w = _randn(3, 4, 2, 8, seed=8, grad=False), _randn(3, 4, 2, 8, seed=9, grad=False), _randn(8, seed=10)
    of = o.float()
    expect = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + 1e-6) * w * F.silu(g)
    assert rel_err(gated_rms_norm_reference(o, w.detach(), g, 1e-6), expect) < 1e-6
    u = of * F.silu(g)  # gate first: Mamba-2's RMSNorm of the gated output
    expect = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    assert rel_err(gated_rms_norm_reference(o, w.detach(), g, 1e-6, gate_first=True), expect) < 1e-6
    with pytest.raises(ValueError, match="activation"):
        gated_rms_norm(o, w, g, 1e-6, "relu")
    with pytest.raises(ValueError, match="gate has shape"):
        gated_rms_norm(o, w, g[..., :4], 1e-6)


@pytest.mark.skipif(not CUDA, reason="bfloat16 kernels are checked on CUDA only")
@pytest.mark.parametrize("gate_first", [False, True])
def test_gated_rms_norm_bfloat16_on_cuda(gate_first):
    o, g, w = _randn(4096, 6, 256, seed=11), _randn(4096, 6, 256, seed=12), _randn(256, seed=13)
    ob, gb, wb = (t.detach().bfloat16().requires_grad_() for t in (o, g, w))
    yb = gated_rms_norm(ob, wb, gb, 1e-6, gate_first=gate_first)
    y = gated_rms_norm_reference(o, w, g, 1e-6, gate_first=gate_first)
    assert rel_err(yb, y) < 1e-2
    for a, b in zip(_grads(yb, (ob, wb, gb), 0), _grads(y, (o, w, g), 0), strict=True):
        assert rel_err(a, b) < 1e-2


@pytest.mark.skipif(not CUDA, reason="bfloat16 kernels are checked on CUDA only")
def test_bfloat16_on_cuda():
    x, w, r = _randn(64, 4096, seed=0), _randn(4096, seed=1), _randn(64, 4096, seed=2)
    xb, wb, rb = (t.detach().bfloat16().requires_grad_() for t in (x, w, r))
    yb, sb = rms_norm(xb, wb, 1e-6, rb)
    y, s = rms_norm_reference(x, w, 1e-6, r)
    assert rel_err(yb, y) < 1e-2 and rel_err(sb, s) < 1e-2
    for gb, g in zip(_grads((yb, sb), (xb, wb, rb), 0), _grads((y, s), (x, w, r), 0), strict=True):
        assert rel_err(gb, g) < 1e-2
    a, b = _randn(8, 3000, seed=3), _randn(8, 3000, seed=4)
    assert rel_err(swiglu(a.bfloat16(), b.bfloat16()), F.silu(a) * b) < 1e-2
    q = _randn(2, 33, 8, 128, seed=5)
    ang = _randn(33, 64, seed=6, grad=False)
    assert (
        rel_err(apply_rotary(q.bfloat16(), ang.cos(), ang.sin()), apply_rotary_reference(q, ang.cos(), ang.sin()))
        < 1e-2
    )


@pytest.mark.parametrize("shape", [(1, 5), (37, 300), (1030, 3, 4), (0, 6), (40, 2100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sum_partials_is_the_sum_over_programs(shape, dtype):
    """effarch.ops.partials.sum_partials: per-program partial sums [R, ...] reduced over R in float32 and cast once
    (several column blocks of each width, rows not a multiple of the row block, no rows at all)."""
    from effarch.ops.partials import column_block, sum_partials

    assert [column_block(c) for c in (5, 1024, 8192, 10**6)] == [8, 8, 32, 128]

    part = _randn(*shape, seed=0, grad=False)
    out = sum_partials(part, dtype)
    assert out.dtype == dtype and out.shape == shape[1:]
    ref = part.double().sum(0)
    assert (out.double() - ref).abs().max() <= (1e-5 if dtype == torch.float32 else 8e-3) * (1 + ref.abs().max())
