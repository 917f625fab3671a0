"""Triton kernels of the selective scan against the token-by-token reference.

On a machine without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1) at tiny shapes,
with chunks of 16 tokens (T = 70 and 130 cross several chunk boundaries; the backward walks every chunk
from its saved start state), also of 8 and of 64 (the length picked off CUDA). float32 inputs against the
float64 reference: outputs, final states and the gradient of every input within rel 1e-5 (float32 rounding
only); bfloat16 inputs within 2e-2. A last test builds both kernels for sm_90 without a GPU. Every buffer
the kernels fill starts as NaN (ops.POISON), so an element no kernel wrote fails.
On CUDA: bfloat16 at a real shape (B=2, T=2048, D=512, N=16) within rel 1e-2 of the PyTorch parallel scan,
and float32 packed sequences within 1e-4 of the reference.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import rel_err
from triton_mode import CUDA, fresh_process_only, restore_environment, run_file_in_fresh_process  # noqa: F401

pytest.importorskip("triton")

from effarch.ops.kernel_fallback import KernelFallback  # noqa: E402
from effarch.ops.scan import selective_scan, selective_scan_parallel, selective_scan_reference  # noqa: E402
from effarch.ops.scan.triton import ops, selective_scan_triton, triton_supports  # noqa: E402

# the dispatching module (the package's attribute of that name is the function)
dispatch = importlib.import_module("effarch.ops.scan.selective_scan")
DEV = "cuda" if CUDA else "cpu"
ON_CPU = pytest.mark.skipif(CUDA, reason="interpreter tests; the CUDA tests below cover the GPU")


def test_in_fresh_process():
    run_file_in_fresh_process(__file__)


@pytest.fixture(autouse=True)
def _poison_and_chunk(monkeypatch):
    monkeypatch.setattr(ops, "POISON", True)
    if not CUDA:
        monkeypatch.setattr(ops, "CHUNK", 16)


def make(Bs=1, T=20, ch=8, N=4, G=None, dtype=torch.float32, n_seq=None, seed=0, **options):
    """Inputs of selective_scan as one dict, ch channels; options (all on by default): z, D, dt_bias,
    dt_softplus, initial_state. Without softplus the step is positive (|dt|)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    bc = (Bs, T, N) if G is None else (Bs, T, G, N)
    inputs = dict(x=r(Bs, T, ch), dt=r(Bs, T, ch), A=-(0.2 + 2 * torch.rand(ch, N, generator=g)), B=r(*bc), C=r(*bc))
    inputs.update(z=r(Bs, T, ch), D=r(ch), dt_bias=r(ch) * 0.5, dt_softplus=True, initial_state=r(n_seq or Bs, ch, N))
    for name in [n for n, on in options.items() if not on]:
        del inputs[name]
    inputs.setdefault("dt_softplus", False)
    if not inputs["dt_softplus"]:
        inputs["dt"] = inputs["dt"].abs() * 0.5
    state_dtype = {"A": torch.float32, "initial_state": torch.float32}  # A and states stay float32
    return {n: t.to(DEV, state_dtype.get(n, dtype)) if torch.is_tensor(t) else t for n, t in inputs.items()}


def outputs_and_grads(fn, inputs, cu=None, final=True, seed=1, dtype=None):
    """(y, final, d<every tensor input>) for a random linear function of y and the final state; inputs cast to
    `dtype` first (the reference runs in float64)."""
    leaves = {n: t.detach().clone() for n, t in inputs.items() if torch.is_tensor(t)}
    if dtype is not None:
        leaves = {n: t.to(dtype) for n, t in leaves.items()}
    leaves = {n: t.requires_grad_() for n, t in leaves.items()}
    flags = {n: v for n, v in inputs.items() if not torch.is_tensor(v)}
    y, f = fn(**leaves, **flags, output_final_state=final, cu_seqlens=cu)
    g = torch.Generator().manual_seed(seed)
    loss = (y.double() * torch.randn(y.shape, generator=g, dtype=torch.float64).to(DEV)).sum()
    if final:
        loss = loss + (f.double() * torch.randn(f.shape, generator=g, dtype=torch.float64).to(DEV)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {"y": y, **({"final": f} if final else {}), **{f"d{n}": x for n, x in zip(leaves, grads)}}


def assert_all_close(ours, ref, tol):
    assert ours.keys() == ref.keys()
    for name in ref:
        assert ours[name].shape == ref[name].shape, name
        assert torch.isfinite(ours[name]).all(), f"{name} has non-finite values"
        err = rel_err(ours[name], ref[name])
        assert err < tol, f"{name}: relative error {err:.2e} >= {tol:.0e}"


def as_double(inputs):
    return {n: t.double() if torch.is_tensor(t) else t for n, t in inputs.items()}


def check(inputs, cu=None, final=True, tol=1e-5):
    ours = outputs_and_grads(selective_scan_triton, inputs, cu, final)
    ref = outputs_and_grads(selective_scan_reference, inputs, cu, final, dtype=torch.float64)
    assert_all_close(ours, ref, tol)
    return ours


# ----------------------------------------------------------------------------- CPU interpreter


@ON_CPU
@pytest.mark.parametrize("T", [1, 7, 70, 130])
def test_matches_reference_across_chunk_boundaries(T):
    """Every option on (gate, skip, dt_bias with softplus, initial state); B = 2."""
    check(make(Bs=2, T=T, seed=T))


@ON_CPU
@pytest.mark.parametrize(
    "options",
    [
        dict(z=False, D=False, dt_bias=False, dt_softplus=False, initial_state=False),
        dict(z=False),
        dict(D=False, initial_state=False),
        dict(dt_bias=False),
        dict(dt_softplus=False),
    ],
    ids=["bare", "no_gate", "gate_without_skip", "softplus_without_bias", "no_softplus"],
)
def test_optional_inputs(options):
    final = options.get("initial_state", True)  # also the path without a final-state gradient
    check(make(T=21, seed=3, **options), final=final)


@ON_CPU
def test_groups_and_partial_channel_blocks(monkeypatch):
    """G = 2 groups of 6 channels in blocks of 4: the second block of each group is half masked, and the
    dB, dC partials of two blocks are summed. Chunks of 8 tokens."""
    monkeypatch.setattr(ops, "MAX_BLOCK_D", 4)
    monkeypatch.setattr(ops, "CHUNK", 8)
    check(make(T=19, ch=12, G=2, N=5, seed=4))


@ON_CPU
@pytest.mark.parametrize("programs", [1024, 2])
def test_packed_sequences_match_reference(programs, monkeypatch):
    """Three sequences (one of a single token) and an empty one, each with its own initial state; with a
    backward program per sequence, or one program walking all four sequences (reusing its scratch)."""
    monkeypatch.setattr(ops, "MAX_BWD_PROGRAMS", programs)
    lens = [40, 1, 0, 34]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=DEV)
    inputs = make(T=sum(lens), G=2, n_seq=len(lens), seed=5)
    ours = check(inputs, cu)
    assert torch.equal(ours["final"][2], inputs["initial_state"][2])  # the empty sequence keeps its state


@ON_CPU
def test_bfloat16_inputs(monkeypatch):
    """bfloat16 token tensors (float32 state and accumulation), outputs and gradients in bfloat16; the
    chunk length the host picks by itself (64 off CUDA: T = 70 spans two chunks)."""
    monkeypatch.setattr(ops, "CHUNK", None)
    inputs = make(T=70, G=2, dtype=torch.bfloat16, seed=6)
    ours = outputs_and_grads(selective_scan_triton, inputs)
    ref = outputs_and_grads(selective_scan_reference, inputs, dtype=torch.float64)
    assert ours["y"].dtype == ours["dx"].dtype == torch.bfloat16 and ours["final"].dtype == torch.float32
    assert_all_close(ours, ref, 2e-2)


@ON_CPU
def test_half_inputs_without_gradients_save_no_states(monkeypatch):
    """float16 forward without autograd: no chunk states are written (save_states off), same result."""
    calls = []
    op = ops.scan_fwd_op_call
    monkeypatch.setattr(ops, "scan_fwd_op_call", lambda *a: calls.append(a[-1]) or op(*a))
    inputs = make(T=18, dtype=torch.float16, seed=7)
    with torch.no_grad():
        y, f = selective_scan_triton(**inputs, output_final_state=True)
    y_ref, f_ref = selective_scan_reference(**as_double(inputs), output_final_state=True)
    assert calls == [False] and y.dtype == torch.float16
    assert rel_err(y, y_ref) < 2e-3 and rel_err(f, f_ref) < 2e-3


@ON_CPU
def test_empty_input_returns_the_initial_state():
    inputs = make(Bs=2, T=0, seed=8)
    y, f = selective_scan_triton(**inputs, output_final_state=True)
    assert y.shape == (2, 0, 8) and torch.equal(f, inputs["initial_state"])


@ON_CPU
def test_backend_triton_through_the_dispatcher_and_bad_dtypes():
    inputs = make(T=6, seed=9)
    y, f = selective_scan(**inputs, output_final_state=True, backend="triton")
    y_ref, f_ref = selective_scan_triton(**inputs, output_final_state=True)
    assert torch.equal(y, y_ref) and torch.equal(f, f_ref)
    with pytest.raises(ValueError, match="float64"):
        selective_scan(**as_double(inputs), backend="triton")
    big = make(T=2, N=300)
    with pytest.raises(ValueError, match="N = 300"):
        selective_scan(**big, backend="triton")


def test_auto_on_cpu_tensors_uses_the_parallel_scan(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the Triton kernel must not run for CPU tensors with backend='auto'")

    monkeypatch.setattr(dispatch, "_load_triton", lambda: (forbidden, lambda *a, **kw: True))
    inputs = {n: t.cpu() if torch.is_tensor(t) else t for n, t in make(T=9, seed=10).items()}
    y, _ = selective_scan(**inputs)
    y_ref, _ = selective_scan_parallel(**inputs)
    assert torch.equal(y, y_ref)


def test_auto_falls_back_once_when_a_triton_kernel_cannot_be_built(monkeypatch):
    monkeypatch.setattr(dispatch, "AUTO_TRITON", True)
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("out of shared memory")

    monkeypatch.setattr(dispatch, "_on_gpu", lambda x: True)
    monkeypatch.setattr(dispatch, "_load_triton", lambda: (broken, lambda *a, **kw: True))
    monkeypatch.setattr(dispatch, "_fallback", KernelFallback("selective_scan", "the PyTorch parallel scan"))
    inputs = {n: t.cpu() if torch.is_tensor(t) else t for n, t in make(T=9, seed=11).items()}
    y_ref, _ = selective_scan(**inputs, backend="torch")
    with pytest.warns(UserWarning, match="Triton kernels failed"):
        y, _ = selective_scan(**inputs)
    torch.testing.assert_close(y, y_ref)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        selective_scan(**inputs)  # remembered: no second attempt, no second warning
    assert len(calls) == 1


@ON_CPU
def test_auto_keeps_the_parallel_scan_when_disabled(monkeypatch):
    """EFFARCH_SCAN_TRITON=0 keeps "auto" on the PyTorch scan even on a GPU."""
    monkeypatch.setattr(dispatch, "AUTO_TRITON", False)
    monkeypatch.setattr(dispatch, "_on_gpu", lambda x: True)
    monkeypatch.setattr(dispatch, "_load_triton", lambda: pytest.fail("the kernel must not be loaded"))
    inputs = make(T=5, seed=13)
    y, _ = selective_scan(**inputs)
    assert rel_err(y, selective_scan_reference(**inputs)[0]) < 1e-5


@ON_CPU
def test_auto_runs_the_kernel_when_on_a_gpu(monkeypatch):
    monkeypatch.setattr(dispatch, "AUTO_TRITON", True)
    calls = []
    real = dispatch._load_triton()
    monkeypatch.setattr(dispatch, "_on_gpu", lambda x: True)
    counted = lambda *a, **kw: calls.append(1) or real[0](*a, **kw)
    monkeypatch.setattr(dispatch, "_load_triton", lambda: (counted, real[1]))
    inputs = make(T=5, seed=12)
    y, _ = selective_scan(**inputs)
    y_ref, _ = selective_scan_reference(**inputs)
    assert calls and rel_err(y, y_ref) < 1e-5
    selective_scan(**as_double(inputs))  # float64: the PyTorch form
    assert len(calls) == 1


def test_supports():
    inputs = make(T=3)
    here = CUDA or os.environ.get("TRITON_INTERPRET") == "1"
    assert triton_supports(**inputs) == here
    assert triton_supports(**{**inputs, "x": inputs["x"].bfloat16()}) == here
    assert not triton_supports(**as_double(inputs))
    assert not triton_supports(**make(T=3, N=257))


def test_imports_cleanly_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from effarch.ops.scan.triton import HAS_TRITON, triton_supports\n"
        "from effarch.ops.scan import selective_scan\n"
        "x = torch.zeros(1, 2, 4)\n"
        "assert not HAS_TRITON and not triton_supports(x, x, torch.zeros(4, 3), x[..., :3], x[..., :3])\n"
        "selective_scan(x, x, -torch.ones(4, 3), x[..., :3], x[..., :3])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@ON_CPU
def test_fake_implementation_matches_schema():
    inputs = make(T=5, G=2, seed=13)
    flat = lambda t: t[0].contiguous()
    cu = torch.tensor([0, 5], dtype=torch.int64)
    args = (
        flat(inputs["x"]), flat(inputs["dt"]), inputs["A"], flat(inputs["B"]), flat(inputs["C"]), inputs["D"],
        flat(inputs["z"]), inputs["dt_bias"], inputs["initial_state"], cu, True, 5, 16, True, True,
    )  # fmt: skip
    torch.library.opcheck(ops.scan_fwd_op, args, test_utils=("test_schema", "test_faketensor"))


@ON_CPU
def test_custom_ops_trace_under_torch_compile():
    """fullgraph compile (aot_eager: tracing through the custom ops and their fake implementations)."""
    inputs = make(T=6, seed=14)
    names = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_state"]

    def f(*tensors):
        y, h = selective_scan_triton(**dict(zip(names, tensors)), dt_softplus=True, output_final_state=True)
        return y.sum() + h.sum()

    args = [inputs[n].clone().requires_grad_() for n in names]
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    grads = torch.autograd.grad(compiled(*args), args)
    ref = torch.autograd.grad(f(*args), args)
    for a, b in zip(grads, ref):
        assert rel_err(a, b) < 1e-6


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
class TestCuda:
    def test_bf16_matches_parallel_scan_at_a_real_shape(self):
        inputs = make(Bs=2, T=2048, ch=512, N=16, dtype=torch.bfloat16)
        inputs["A"] = -torch.arange(1, 17, device=DEV, dtype=torch.float32).expand(512, 16).contiguous()
        inputs["initial_state"] = inputs["initial_state"] * 0.1
        ours = outputs_and_grads(selective_scan_triton, inputs)
        ref = outputs_and_grads(selective_scan_parallel, inputs, dtype=torch.float32)
        assert_all_close(ours, ref, 1e-2)

    def test_float32_packed_matches_reference(self):
        cu = torch.tensor([0, 70, 70, 300], device=DEV)
        check(make(T=300, ch=64, N=16, G=2, n_seq=3), cu, tol=1e-4)

    def test_auto_picks_the_kernel(self, monkeypatch):
        monkeypatch.setattr(dispatch, "AUTO_TRITON", True)
        calls = []
        real = dispatch._load_triton()
        counted = lambda *a, **kw: calls.append(1) or real[0](*a, **kw)
        monkeypatch.setattr(dispatch, "_load_triton", lambda: (counted, real[1]))
        inputs = make(T=100, ch=64, N=16, dtype=torch.bfloat16)
        y, _ = selective_scan(**inputs)
        assert calls and y.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- the GPU build, without a GPU

_COMPILE_FOR_HOPPER = """
import inspect
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from effarch.ops.scan.triton import kernels

def build(fn, types, consts, warps):
    params = list(inspect.signature(fn.fn).parameters)
    signature = {p: "constexpr" if p in consts else types[p] for p in params}
    constexprs = {(params.index(k),): v for k, v in consts.items()}
    triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})

t = dict(x="*bf16", dt="*bf16", A="*fp32", Bm="*bf16", Cm="*bf16", Dk="*fp32", z="*bf16", dt_bias="*fp32", h0="*fp32",
         y="*bf16", hT="*fp32", hc="*fp32", cu="*i64", seq_chunk="*i64", dy="*bf16", dhT="*fp32", dx="*bf16",
         ddt="*bf16", dz="*bf16", dB="*fp32", dC="*fp32", dA="*fp32", dD="*fp32", dbias="*fp32", dh0="*fp32",
         scratch="*fp32", T="i32", NS="i32")
c = dict(D=512, N=16, G=1, DG=512, NB=8, BD=64, BN=16, CHUNK=64, SOFTPLUS=True, HAS_D=True, HAS_Z=True,
         HAS_BIAS=True, HAS_H0=True)
build(kernels.scan_fwd_kernel, t, dict(c, STORE_FINAL=True, SAVE_CHUNKS=True), 2)
build(kernels.scan_bwd_kernel, t, dict(c, HAS_DHT=True), 8)
"""


def test_kernels_compile_for_hopper():
    """The interpreter does not run Triton's GPU compiler: build both kernels for sm_90 (bfloat16, every
    option on) ahead of time, with the compiler Triton ships, so a kernel that only the GPU build rejects
    fails here too."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
