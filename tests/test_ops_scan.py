"""The selective scan: parallel form against the step-by-step reference, hand-computed values, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from effarch.ops.scan import linear_scan, selective_scan, selective_scan_reference


def make_inputs(Bs=2, T=9, D=6, N=4, G=None, dtype=torch.float64, extras=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    bc = (Bs, T, N) if G is None else (Bs, T, G, N)
    args = dict(
        x=r(Bs, T, D),
        dt=r(Bs, T, D),
        A=-torch.rand(D, N, generator=g, dtype=torch.float64).to(dtype) * 2,
        B=r(*bc),
        C=r(*bc),
    )
    kw = {}
    if extras:
        kw = dict(D=r(D), z=r(Bs, T, D), dt_bias=r(D), dt_softplus=True)
    else:  # a positive step without softplus
        args["dt"] = args["dt"].abs() * 0.3
    return args, kw


def both(args, kw, **more):
    ref = selective_scan(**args, **kw, **more, output_final_state=True, backend="reference")
    out = selective_scan(**args, **kw, **more, output_final_state=True, backend="torch")
    return out, ref


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T", [1, 2, 7, 16, 33])
@pytest.mark.parametrize("G", [None, 1, 3])
def test_parallel_matches_reference(dtype, T, G):
    args, kw = make_inputs(T=T, G=G, dtype=dtype)
    h0 = torch.randn(2, 6, 4, dtype=dtype)
    (y, f), (y_ref, f_ref) = both(args, kw, initial_state=h0)
    assert y.dtype == dtype and f.dtype == dtype
    assert_close(y, y_ref)
    assert_close(f, f_ref)


@pytest.mark.parametrize("extras", [False, True])
def test_optional_paths_match_reference(extras):
    args, kw = make_inputs(T=11, extras=extras)
    (y, f), (y_ref, f_ref) = both(args, kw)
    assert_close(y, y_ref)
    assert_close(f, f_ref)


def test_reference_matches_hand_computed_values():
    # D = N = 1, two tokens: h1 = dt1 B1 x1, h2 = e^{dt2 A} h1 + dt2 B2 x2; y = C h + D x, gated.
    x = torch.tensor([[[2.0], [-1.0]]], dtype=torch.float64)
    dt_raw = torch.tensor([[[0.3], [-0.2]]], dtype=torch.float64)
    A = torch.tensor([[-1.5]], dtype=torch.float64)
    B = torch.tensor([[[0.5], [2.0]]], dtype=torch.float64)
    C = torch.tensor([[[1.0], [-3.0]]], dtype=torch.float64)
    Dk = torch.tensor([0.25], dtype=torch.float64)
    z = torch.tensor([[[0.7], [1.1]]], dtype=torch.float64)
    bias = torch.tensor([0.1], dtype=torch.float64)
    dt1, dt2 = F.softplus(torch.tensor(0.4, dtype=torch.float64)), F.softplus(torch.tensor(-0.1, dtype=torch.float64))
    h1 = dt1 * 0.5 * 2.0
    h2 = torch.exp(dt2 * -1.5) * h1 + dt2 * 2.0 * -1.0
    y1 = (1.0 * h1 + 0.25 * 2.0) * F.silu(torch.tensor(0.7, dtype=torch.float64))
    y2 = (-3.0 * h2 + 0.25 * -1.0) * F.silu(torch.tensor(1.1, dtype=torch.float64))
    for backend in ("reference", "torch"):
        y, f = selective_scan(
            x, dt_raw, A, B, C, Dk, z, dt_bias=bias, dt_softplus=True, output_final_state=True, backend=backend
        )
        assert torch.allclose(y.flatten(), torch.stack([y1, y2]), rtol=1e-12, atol=0)
        assert torch.allclose(f.flatten(), h2.reshape(1), rtol=1e-12, atol=0)


def test_groups_share_B_and_C_across_their_channels():
    # G groups equal the ungrouped scan run on each group's channel slice with that group's B, C.
    args, kw = make_inputs(T=8, D=6, G=2, extras=False)
    y, _ = selective_scan(**args, **kw)
    for g in range(2):
        sl = slice(3 * g, 3 * g + 3)
        y_g, _ = selective_scan(
            args["x"][..., sl],
            args["dt"][..., sl],
            args["A"][sl],
            args["B"][:, :, g],
            args["C"][:, :, g],
            backend="reference",
        )
        assert_close(y[..., sl], y_g)


def test_split_with_carried_state_equals_one_call():
    args, kw = make_inputs(T=21)
    y_full, f_full = selective_scan(**args, **kw, output_final_state=True)
    cut = 8

    def part(sl):
        a = {n: (t[:, sl] if t.dim() >= 3 else t) for n, t in args.items()}
        k = {n: (t[:, sl] if isinstance(t, torch.Tensor) and t.dim() == 3 else t) for n, t in kw.items()}
        return a, k

    a1, k1 = part(slice(0, cut))
    a2, k2 = part(slice(cut, None))
    y1, s = selective_scan(**a1, **k1, output_final_state=True)
    y2, f = selective_scan(**a2, **k2, initial_state=s, output_final_state=True)
    assert_close(torch.cat([y1, y2], 1), y_full)
    assert_close(f, f_full)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_packed_sequences_equal_separate(backend):
    lens = [5, 0, 1, 17, 9]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    args, kw = make_inputs(Bs=1, T=sum(lens), G=2)
    h0 = torch.randn(len(lens), 6, 4, dtype=torch.float64)
    y, f = selective_scan(**args, **kw, initial_state=h0, output_final_state=True, cu_seqlens=cu, backend=backend)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        a = {n: (t[:, s:e] if t.dim() >= 3 else t) for n, t in args.items()}
        k = {n: (t[:, s:e] if isinstance(t, torch.Tensor) and t.dim() == 3 else t) for n, t in kw.items()}
        y_i, f_i = selective_scan(**a, **k, initial_state=h0[i : i + 1], output_final_state=True, backend="reference")
        if e > s:
            assert_close(y[:, s:e], y_i)
        assert_close(f[i : i + 1], f_i)


def test_gradients_match_reference():
    args, kw = make_inputs(T=13, G=2)
    h0 = torch.randn(2, 6, 4, dtype=torch.float64)
    leaves = {**args, **{n: t for n, t in kw.items() if isinstance(t, torch.Tensor)}, "initial_state": h0}

    def grads(backend):
        ins = {n: t.detach().clone().requires_grad_() for n, t in leaves.items()}
        y, f = selective_scan(**ins, dt_softplus=True, output_final_state=True, backend=backend)
        g = torch.Generator().manual_seed(3)
        wy = torch.randn(y.shape, generator=g, dtype=y.dtype)
        wf = torch.randn(f.shape, generator=g, dtype=f.dtype)
        ((y * wy).sum() + (f * wf).sum()).backward()
        return {n: t.grad for n, t in ins.items()}

    g, g_ref = grads("torch"), grads("reference")
    for n in leaves:
        assert_close(g[n], g_ref[n], tol=1e-9)


def test_low_precision_inputs_keep_a_float32_state():
    args, kw = make_inputs(T=10, dtype=torch.bfloat16)
    y, f = selective_scan(**args, **kw, output_final_state=True)
    y_ref, f_ref = selective_scan(
        **{n: t.double() for n, t in args.items()},
        **{n: (t.double() if isinstance(t, torch.Tensor) else t) for n, t in kw.items()},
        output_final_state=True,
    )
    assert y.dtype == torch.bfloat16 and f.dtype == torch.float32
    assert_close(y, y_ref, tol=2e-2)
    assert_close(f, f_ref, tol=1e-2)


def test_linear_scan_matches_loop():
    a, b = torch.rand(3, 19, 2, dtype=torch.float64), torch.randn(3, 19, 2, dtype=torch.float64)
    h, hs = torch.zeros(3, 2, dtype=torch.float64), []
    for t in range(19):
        h = a[:, t] * h + b[:, t]
        hs.append(h)
    assert_close(linear_scan(a, b), torch.stack(hs, 1))


def _bad(**changes):
    args, kw = make_inputs(T=5, G=2)
    args.update({k: v for k, v in changes.items() if k in args})
    kw.update({k: v for k, v in changes.items() if k not in args})
    return args, kw


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(x=torch.randn(2, 5)), "x of shape"),
        (dict(dt=torch.randn(2, 4, 6)), "dt has shape"),
        (dict(A=torch.randn(5, 4)), "A has shape"),
        (dict(B=torch.randn(2, 5, 4)), "same shape"),
        (dict(B=torch.randn(2, 5, 4, 4), C=torch.randn(2, 5, 4, 4)), "groups"),
        (dict(B=torch.randn(2, 5, 3), C=torch.randn(2, 5, 3)), "expected"),
        (dict(D=torch.randn(5)), "D has shape"),
        (dict(z=torch.randn(2, 5, 5)), "z has shape"),
        (dict(dt_bias=torch.randn(2)), "dt_bias"),
        (dict(initial_state=torch.randn(2, 6, 5)), "initial_state"),
        (dict(cu_seqlens=torch.tensor([0, 5])), "B = 1"),
        (dict(backend="cuda"), "backend"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_bad_input_is_a_clear_value_error(changes, match, backend):
    changes = {"backend": backend, **changes}
    args, kw = _bad(
        **{k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in changes.items()}
    )
    with pytest.raises(ValueError, match=match):
        selective_scan(**args, **kw)


def test_reference_function_is_exported_and_equal():
    args, kw = make_inputs(T=4)
    y1, _ = selective_scan_reference(**args, **kw)
    y2, _ = selective_scan(**args, **kw, backend="reference")
    assert torch.equal(y1, y2)
