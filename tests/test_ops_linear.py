"""Fast PyTorch forms of the unified linear recurrence (parallel, chunked, dispatch) against the reference."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from effarch.ops import linear as lin
from effarch.ops.kernel_fallback import KernelFallback
from effarch.ops.linear import (
    linear_recurrence,
    linear_recurrence_chunked,
    linear_recurrence_parallel,
    linear_recurrence_reference,
)

H, K, V = 2, 8, 6  # K != V so a transposed state cannot pass
CASES = [
    ("additive", None),
    ("additive", "fixed"),
    ("additive", "scalar"),
    ("additive", "per_key"),
    ("delta", None),
    ("delta", "fixed"),
    ("delta", "scalar"),
]
CASE_IDS = [f"{r}-{d}" for r, d in CASES]
FORMS = {
    "parallel": linear_recurrence_parallel,
    "chunk16": functools.partial(linear_recurrence_chunked, chunk_size=16),
    "chunk32": functools.partial(linear_recurrence_chunked, chunk_size=32),
    "chunk64": linear_recurrence_chunked,
}


def make_inputs(rule, decay, B, T, dtype=torch.float64, *, n_states=None, strong=False, seed=0) -> dict:
    """Random inputs in the ranges the models use: log decays from logsigmoid (or -20..-5 when strong),
    L2-normalised keys and beta in (0, 1) for the delta rule."""
    gen = torch.Generator().manual_seed(seed)
    rn = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)
    q, k, v = rn(B, T, H, K), rn(B, T, H, K), rn(B, T, H, V)
    shape = {None: None, "fixed": (H,), "scalar": (B, T, H), "per_key": (B, T, H, K)}[decay]
    log_decay = None
    if shape is not None:
        if strong:
            log_decay = -5 - 15 * torch.rand(*shape, generator=gen, dtype=dtype)
        else:
            log_decay = F.logsigmoid(rn(*shape) + 1.5)
    beta = None
    if rule == "delta":
        k = F.normalize(k, dim=-1)
        beta = torch.rand(B, T, H, generator=gen, dtype=dtype)
    S0 = rn(n_states or B, H, K, V)
    return dict(q=q, k=k, v=v, log_decay=log_decay, beta=beta, rule=rule, initial_state=S0)


def call(fn, inputs: dict, **extra):
    x = dict(inputs)
    q, k, v = x.pop("q"), x.pop("k"), x.pop("v")
    return fn(q, k, v, **x, **extra)


@functools.cache
def reference_case(rule, decay, T, dtype):
    inputs = make_inputs(rule, decay, 2, T, dtype)
    return inputs, call(linear_recurrence_reference, inputs, output_final_state=True)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("T", [1, 7, 63, 64, 65, 150])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("rule,decay", CASES, ids=CASE_IDS)
def test_matches_reference(rule, decay, form, T, dtype):
    inputs, (o_ref, S_ref) = reference_case(rule, decay, T, dtype)
    o, S = call(FORMS[form], inputs, output_final_state=True)
    assert o.dtype == dtype and S.dtype == dtype
    assert_close(o, o_ref, dtype)
    assert_close(S, S_ref, dtype)


@pytest.mark.parametrize("chunk_size", [1, 5, 13, 50])
@pytest.mark.parametrize("rule,decay", [("additive", "per_key"), ("delta", "scalar")])
def test_odd_chunk_sizes(rule, decay, chunk_size):
    inputs, (o_ref, S_ref) = reference_case(rule, decay, 150, torch.float64)
    o, S = call(linear_recurrence_chunked, inputs, output_final_state=True, chunk_size=chunk_size)
    assert_close(o, o_ref)
    assert_close(S, S_ref)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("rule,decay", CASES, ids=CASE_IDS)
def test_without_initial_or_final_state(rule, decay, form):
    inputs = make_inputs(rule, decay, 2, 37)
    inputs["initial_state"] = None
    o_ref, _ = call(linear_recurrence_reference, inputs)
    o, S = call(FORMS[form], inputs)
    assert S is None
    assert_close(o, o_ref)


@pytest.mark.parametrize("form", ["parallel", "chunk16"])
def test_empty_sequence(form):
    inputs = make_inputs("delta", "scalar", 2, 0)
    o, S = call(FORMS[form], inputs, output_final_state=True)
    assert o.shape == (2, 0, H, V)
    assert_close(S, inputs["initial_state"])


@pytest.mark.parametrize("form", ["parallel", "chunk16"])
def test_low_precision_inputs_keep_their_dtype(form):
    low = make_inputs("additive", "per_key", 1, 40, torch.float32)
    low.update({n: low[n].bfloat16() for n in "qkv"})
    o, S = call(FORMS[form], low, output_final_state=True)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32  # computed and kept in float32
    o_ref, S_ref = call(
        linear_recurrence_reference, {**low, **{n: low[n].float() for n in "qkv"}}, output_final_state=True
    )
    assert_close(o, o_ref, torch.bfloat16)
    assert_close(S, S_ref, torch.float32)


# ----------------------------------------------------------------------------- packed sequences

LENGTHS = [1, 0, 19, 37, 33]  # irregular, with a length-1 and an empty sequence


@pytest.mark.parametrize("form", ["parallel", "chunk16", "chunk64"])
@pytest.mark.parametrize("rule,decay", CASES, ids=CASE_IDS)
def test_packed_equals_separate_sequences(rule, decay, form):
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    packed = make_inputs(rule, decay, 1, int(cu[-1]), n_states=len(LENGTHS))
    o, S = call(FORMS[form], packed, cu_seqlens=cu, output_final_state=True)
    for i, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        # Token tensors are cut to the sequence; a fixed [H] decay is shared by every sequence.
        one = {n: (t[:, a:b] if isinstance(t, torch.Tensor) and t.dim() >= 3 else t) for n, t in packed.items()}
        one["initial_state"] = packed["initial_state"][i : i + 1]
        o_ref, S_ref = call(linear_recurrence_reference, one, output_final_state=True)
        if b > a:
            assert_close(o[:, a:b], o_ref)
        assert_close(S[i : i + 1], S_ref)


# ----------------------------------------------------------------------------- gradients


def grads(fn, inputs, cu_seqlens=None, seed=1):
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items() if isinstance(t, torch.Tensor)}
    o, S = call(fn, {**inputs, **leaves}, cu_seqlens=cu_seqlens, output_final_state=True)
    gen = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
    loss = loss + (S * torch.randn(S.shape, generator=gen, dtype=S.dtype)).sum()
    return dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))


@pytest.mark.parametrize("form", ["parallel", "chunk16"])
@pytest.mark.parametrize("rule,decay", CASES, ids=CASE_IDS)
def test_gradients_match_reference(rule, decay, form):
    inputs = make_inputs(rule, decay, 2, 37)
    expected = grads(linear_recurrence_reference, inputs)
    got = grads(FORMS[form], inputs)
    assert set(got) == set(expected) and "initial_state" in got
    for name in expected:
        assert_close(got[name], expected[name], tol=1e-10)


@pytest.mark.parametrize("form", ["reference", "parallel", "chunk16"])
@pytest.mark.parametrize("rule,decay", CASES, ids=CASE_IDS)
def test_key_groups_equal_repeated_keys(rule, decay, form):
    """q, k with one head serving both value heads (Mamba2's shared B and C) equal q, k repeated per head; the
    group's gradient is the sum of its heads' (checked against the repeated call's)."""
    inputs = make_inputs(rule, decay, 2, 37)
    inputs["q"], inputs["k"] = inputs["q"][:, :, :1], inputs["k"][:, :, :1]
    repeated = {**inputs, "q": inputs["q"].expand(-1, -1, H, -1), "k": inputs["k"].expand(-1, -1, H, -1)}
    fn = linear_recurrence_reference if form == "reference" else FORMS[form]
    got = grads(fn, inputs)
    want = grads(linear_recurrence_reference, repeated)  # per repeated head: the group's is their sum
    want["q"], want["k"] = want["q"].sum(2, keepdim=True), want["k"].sum(2, keepdim=True)
    for name in want:
        assert got[name].shape == want[name].shape
        assert_close(got[name], want[name], tol=1e-10)
    o, f = call(fn, inputs, output_final_state=True)
    o_ref, f_ref = call(linear_recurrence_reference, repeated, output_final_state=True)
    assert_close(o, o_ref, tol=1e-12)
    assert_close(f, f_ref, tol=1e-12)


@pytest.mark.parametrize("rule,decay", [("additive", "per_key"), ("delta", "scalar")])
def test_packed_gradients_match_reference(rule, decay):
    cu = torch.tensor([0, 1, 1, 20, 45])
    inputs = make_inputs(rule, decay, 1, 45, n_states=4)
    expected = grads(linear_recurrence_reference, inputs, cu)
    got = grads(FORMS["chunk16"], inputs, cu)
    for name in expected:
        assert_close(got[name], expected[name], tol=1e-10)


# ----------------------------------------------------------------------------- strong decay


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("rule,decay", [("additive", "scalar"), ("additive", "per_key"), ("delta", "scalar")])
def test_strong_decay_long_sequence_stays_finite(rule, decay, dtype):
    # Cumulative log decays reach about -12.5 * 512 over the sequence and -800 within a chunk: any exp of a
    # positive cumulative sum would overflow, and subnormal intermediates would show up as slowness.
    inputs = make_inputs(rule, decay, 1, 512, dtype, strong=True)
    o_ref, S_ref = call(linear_recurrence_reference, inputs, output_final_state=True)
    o, S = call(linear_recurrence_chunked, inputs, output_final_state=True)
    assert_close(o, o_ref, dtype)
    assert_close(S, S_ref, dtype)
    got = grads(linear_recurrence_chunked, inputs)
    assert all(torch.isfinite(g).all() for g in got.values())


# ----------------------------------------------------------------------------- dispatch


@pytest.fixture
def spies(monkeypatch):
    calls = []
    for name in ("linear_recurrence_parallel", "linear_recurrence_chunked"):
        real = getattr(lin, name)

        def spy(*a, _real=real, _name=name, **kw):
            calls.append(_name)
            return _real(*a, **kw)

        monkeypatch.setattr(lin, name, spy)
    return calls


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize(
    "T,form", [(5, "linear_recurrence_parallel"), (64, "linear_recurrence_parallel"), (65, "linear_recurrence_chunked")]
)
def test_dispatch_picks_the_form_by_length(spies, backend, T, form):
    inputs, (o_ref, S_ref) = reference_case("additive", "scalar", T, torch.float64)
    o, S = call(linear_recurrence, inputs, output_final_state=True, backend=backend)
    assert spies == [form]
    assert_close(o, o_ref)
    assert_close(S, S_ref)


def test_dispatch_reference_backend_uses_the_loop(spies):
    inputs, (o_ref, _) = reference_case("delta", None, 7, torch.float64)
    o, _ = call(linear_recurrence, inputs, backend="reference")
    assert spies == []
    assert torch.equal(o, o_ref)


def test_delta_per_key_falls_back_to_reference_with_one_warning(monkeypatch):
    monkeypatch.setattr(lin, "_warned", set())
    inputs = make_inputs("delta", "per_key", 2, 70)
    for fn in (linear_recurrence_parallel, linear_recurrence_chunked):
        with pytest.raises(NotImplementedError, match="per-key"):
            call(fn, inputs)
    o_ref, S_ref = call(linear_recurrence_reference, inputs, output_final_state=True)
    with pytest.warns(UserWarning, match="falling back"):
        o, S = call(linear_recurrence, inputs, output_final_state=True, backend="torch")
    assert_close(o, o_ref)
    assert_close(S, S_ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(linear_recurrence, inputs, backend="torch")  # no second warning


def test_triton_backend_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(lin, "_triton", ImportError("no module named effarch.ops.linear.triton"))
    inputs = make_inputs("additive", None, 1, 4)
    with pytest.raises(RuntimeError, match="backend 'triton' is unavailable"):
        call(linear_recurrence, inputs, backend="triton")
    call(linear_recurrence, inputs, backend="auto")  # CPU tensors: torch forms, no error


def test_auto_uses_triton_only_for_supported_cuda_tensors(monkeypatch, spies):
    used = []
    fake = (lambda *a, **kw: used.append("run"), lambda **kw: used.append("asked") or True)
    monkeypatch.setattr(lin, "_triton", fake)
    inputs = make_inputs("additive", None, 1, 4)
    call(linear_recurrence, inputs, backend="auto")
    assert used == [] and spies == ["linear_recurrence_parallel"]  # CPU tensors never reach Triton
    call(linear_recurrence, inputs, backend="triton")
    assert used == ["run"]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("chunk_size", [0, -4, 2.5, True, "64"])
def test_bad_chunk_size(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        call(linear_recurrence_chunked, make_inputs("additive", None, 1, 4), chunk_size=chunk_size)


BAD = {
    "q is 3-D": (dict(q=torch.randn(1, 4, H)), "expects q, k"),
    "k shape": (dict(k=torch.randn(1, 4, H, K + 1)), "do not match"),
    "key heads not dividing": (dict(q=torch.randn(1, 4, 3, K), k=torch.randn(1, 4, 3, K)), "divide them"),
    "log_decay shape": (dict(log_decay=torch.randn(1, 4)), "log_decay has shape"),
    "unknown rule": (dict(rule="hebbian"), "rule 'hebbian'"),
    "beta without delta": (dict(beta=torch.rand(1, 4, H)), "beta is only used"),
    "delta without beta": (dict(rule="delta"), "needs beta"),
    "initial_state shape": (dict(initial_state=torch.zeros(2, H, K, V)), "initial_state has shape"),
}


@pytest.mark.parametrize("fn", [linear_recurrence_parallel, linear_recurrence_chunked, linear_recurrence])
@pytest.mark.parametrize("bad", BAD, ids=list(BAD))
def test_bad_inputs_raise_value_error(fn, bad):
    change, message = BAD[bad]
    inputs = {**make_inputs("additive", None, 1, 4, torch.float32), **change}
    with pytest.raises(ValueError, match=message):
        call(fn, inputs)


@pytest.mark.parametrize("fn", [linear_recurrence_parallel, linear_recurrence_chunked])
def test_bad_cu_seqlens(fn):
    inputs = make_inputs("additive", None, 2, 6)
    with pytest.raises(ValueError, match="B = 1"):
        call(fn, inputs, cu_seqlens=torch.tensor([0, 6]))
    inputs = make_inputs("additive", None, 1, 6)
    with pytest.raises(ValueError, match="cu_seqlens"):
        call(fn, inputs, cu_seqlens=torch.tensor([0, 4]))


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend 'cuda'"):
        call(linear_recurrence, make_inputs("additive", None, 1, 4), backend="cuda")


def test_auto_falls_back_once_when_a_triton_kernel_cannot_be_built(monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("out of shared memory")

    monkeypatch.setattr(lin, "_on_gpu", lambda q: True)
    monkeypatch.setattr(lin, "_load_triton", lambda: (broken, lambda **kw: True))
    monkeypatch.setattr(lin, "_fallback", KernelFallback("linear_recurrence", "the PyTorch chunked form"))
    q, k, v = (torch.randn(1, 20, 2, 8) for _ in range(3))
    ref, _ = lin.linear_recurrence(q, k, v, backend="torch")
    with pytest.warns(UserWarning, match="Triton kernels failed"):
        out, _ = lin.linear_recurrence(q, k, v)
    torch.testing.assert_close(out, ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lin.linear_recurrence(q, k, v)  # remembered: no second attempt, no second warning
    assert len(calls) == 1
