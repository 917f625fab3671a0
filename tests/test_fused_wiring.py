"""The model's fused path (RMSNorm with the residual add, SwiGLU, rotary as Triton kernels) equals its PyTorch
path, and the switch that picks between them (`effarch.ops.fused.enabled` / `use_fused` / EFFARCH_FUSED).

Without CUDA the kernels are forced onto the CPU under the Triton interpreter (TRITON_INTERPRET=1), float32,
at debug size: logits and every gradient within rel 1e-4, and the kernels are seen to run (their custom ops are
recorded), so a wiring that silently took the PyTorch path cannot pass.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys

import pytest
import torch
from conftest import rel_err
from torch.utils._python_dispatch import TorchDispatchMode
from triton_mode import CUDA, fresh_process_only, restore_environment, run_file_in_fresh_process  # noqa: F401

pytest.importorskip("triton")

from effarch import build_model  # noqa: E402
from effarch.compile import compile_model  # noqa: E402
from effarch.models.presets import preset_config  # noqa: E402
from effarch.ops import (
    custom_op,  # noqa: E402
    fused,  # noqa: E402
)

DEV = "cuda" if CUDA else "cpu"
FORCE = True if CUDA else "force"  # on CUDA the ordinary switch suffices
TOL = 1e-4
FUSED_OPS = {
    "fused_rms_norm_fwd",
    "fused_rms_norm_fwd+residual",  # the block's residual add folded into the norm
    "fused_rms_norm_bwd",
    "fused_swiglu_packed_fwd",
    "fused_swiglu_packed_bwd",
    "fused_rotary",
}


@pytest.fixture(autouse=True)
def _restore_switch():
    saved = fused._mode
    yield
    fused._mode = saved


class _RecordOps(TorchDispatchMode):
    """Names of the fused kernels (effarch::fused_*) that run inside the block: called directly in eager mode
    (effarch.ops.custom_op) or dispatched as custom ops (compiled code)."""

    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def _record(self, name: str, args) -> None:
        name = name.split("::")[-1].split(".")[0]
        if name.startswith("fused_"):  # not the linear-recurrence ops
            with_residual = name == "fused_rms_norm_fwd" and args[2] is not None
            self.names.add(name + ("+residual" if with_residual else ""))

    def __enter__(self):
        call = custom_op.KernelCall.__call__

        def spy(kernel, *args):
            if not torch.compiler.is_compiling():
                self._record(kernel.name, args)
            return call(kernel, *args)

        self._call = call
        custom_op.KernelCall.__call__ = spy
        return super().__enter__()

    def __exit__(self, *exc):
        custom_op.KernelCall.__call__ = self._call
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "effarch":
            self._record(func.__name__, args)
        return func(*args, **(kwargs or {}))


def test_in_fresh_process():
    run_file_in_fresh_process(__file__)


def _run(model, ids, **kwargs):
    """Logits and every parameter's gradient of the next-token loss."""
    model.zero_grad(set_to_none=True)
    out = model(ids, targets=ids.roll(-1, 1), **kwargs)
    out.loss.backward()
    return out.logits.detach(), [p.grad.clone() for p in model.parameters()]


def _assert_same(a, b):
    assert rel_err(a[0], b[0]) < TOL
    assert len(a[1]) == len(b[1])
    for ga, gb in zip(a[1], b[1], strict=True):
        assert torch.isfinite(ga).all() and rel_err(ga, gb) < TOL


@pytest.mark.parametrize(
    "preset,expected",
    [
        ("transformer:debug", FUSED_OPS),
        # no rotary in Gated DeltaNet; its per-head norm and output gate run fused, and its decay and beta gates
        (
            "gated-deltanet:debug",
            FUSED_OPS - {"fused_rotary"}
            | {"fused_gated_rms_norm_fwd", "fused_gated_rms_norm_bwd"}
            | {"fused_delta_gates_fwd", "fused_delta_gates_bwd"},
        ),
        # GLA's per-key decay from its gate's pre-activation too
        (
            "gla:debug",
            FUSED_OPS - {"fused_rotary"}
            | {"fused_gated_rms_norm_fwd", "fused_gated_rms_norm_bwd"}
            | {"fused_log_sigmoid_decay_fwd", "fused_log_sigmoid_decay_bwd"},
        ),
    ],
)
def test_model_fused_equals_pytorch(preset, expected):
    torch.manual_seed(0)
    model = build_model(preset).to(DEV)
    ids = torch.randint(0, 260, (2, 13), device=DEV)
    with fused.use_fused(False), _RecordOps() as off:
        ref = _run(model, ids)
    with fused.use_fused(FORCE), _RecordOps() as on:
        out = _run(model, ids)
    assert off.names == set()
    assert on.names == expected
    _assert_same(out, ref)


@pytest.mark.parametrize("preset", ["gated-deltanet:debug", "gla:debug", "mamba2:debug"])
def test_gated_head_norm_fused_when_switched_on(monkeypatch, preset):
    """With EFFARCH_GATED_NORM_TRITON's flag on (the default), the linear layers' per-head RMSNorm and SiLU gate run
    as the fused kernel (seen running) and the model equals its PyTorch path; off, the kernel is not used."""
    torch.manual_seed(0)
    model = build_model(preset).to(DEV)
    ids = torch.randint(0, 260, (2, 13), device=DEV)
    with fused.use_fused(False):
        ref = _run(model, ids)
    monkeypatch.setattr(fused, "GATED_NORM_ON", False)
    with fused.use_fused(FORCE), _RecordOps() as off:
        _run(model, ids)
    monkeypatch.setattr(fused, "GATED_NORM_ON", True)
    with fused.use_fused(FORCE), _RecordOps() as on:
        out = _run(model, ids)
    gated = {"fused_gated_rms_norm_fwd", "fused_gated_rms_norm_bwd"}
    assert not (off.names & gated) and gated <= on.names
    _assert_same(out, ref)


def test_mamba2_step_and_values_fused(monkeypatch):
    """Mamba-2's step, log decay and scaled values run as one fused kernel each way (seen running) and the model
    equals its PyTorch path, values and gradients; mamba2.FUSED_INPUTS = False keeps the PyTorch form for them
    alone."""
    from effarch.layers.mixers import mamba2

    torch.manual_seed(0)
    model = build_model("mamba2:debug").to(DEV)
    ids = torch.randint(0, 260, (2, 13), device=DEV)
    with fused.use_fused(False):
        ref = _run(model, ids)
    with fused.use_fused(FORCE), _RecordOps() as on:
        out = _run(model, ids)
    ssd = {"fused_ssd_inputs_fwd", "fused_ssd_inputs_bwd"}
    assert ssd <= on.names
    _assert_same(out, ref)
    monkeypatch.setattr(mamba2, "FUSED_INPUTS", False)
    with fused.use_fused(FORCE), _RecordOps() as off:
        _run(model, ids)
    assert not ssd & off.names and "fused_gated_rms_norm_fwd" in off.names


def test_delta_rule_unit_heads_fused():
    """DeltaNet's L2 normalisation of q and k runs as the fused RMSNorm (seen running) and equals F.normalize, values
    and gradients."""
    from effarch.layers.mixers.deltanet import unit_heads

    g = torch.Generator().manual_seed(4)
    t = (torch.randn(2, 9, 3, 32, generator=g) * 3).to(DEV).requires_grad_()
    dy = torch.randn(2, 9, 3, 32, generator=g).to(DEV)
    ref = torch.nn.functional.normalize(t, dim=-1)
    (gref,) = torch.autograd.grad((ref * dy).sum(), t)
    with fused.use_fused(FORCE), _RecordOps() as on:
        out = unit_heads(t)
        (gout,) = torch.autograd.grad((out * dy).sum(), t)
    assert {"fused_rms_norm_fwd", "fused_rms_norm_bwd"} <= on.names
    assert rel_err(out, ref) < 1e-5 and rel_err(gout, gref) < 1e-5


def test_packed_documents_and_decoding_fused():
    # Packed documents (rotary positions restart per document) and cached decoding (rotary offsets, static
    # KV cache) go through the same kernels.
    torch.manual_seed(0)
    model = build_model("transformer:debug").to(DEV)
    ids = torch.randint(0, 260, (1, 11), device=DEV)
    cu = torch.tensor([0, 4, 11], device=DEV)
    prompt = torch.randint(0, 260, (2, 5), device=DEV)
    results = {}
    for mode in (False, FORCE):
        with fused.use_fused(mode):
            packed = _run(model, ids, cu_seqlens=cu)
            tokens = model.generate(prompt, 4, temperature=0, static_cache=True)
            results[mode] = packed, tokens
    _assert_same(results[FORCE][0], results[False][0])
    assert torch.equal(results[FORCE][1], results[False][1])


def test_compiled_fused_model_equals_eager(monkeypatch):
    # The kernels are custom ops: torch.compile traces the fused blocks in one graph each (fullgraph), and the
    # compiled code calls the kernels (counted through the output buffers their modules allocate).
    calls = {}
    for name in ("norm", "glu", "rotary"):
        module = importlib.import_module(f"effarch.ops.fused.{name}")

        def counting(*args, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return fused.empty_like(*args, **kwargs)

        monkeypatch.setattr(module, "empty_like", counting)
    torch.manual_seed(0)
    cfg = dataclasses.replace(preset_config("transformer:debug"), layers="attn")
    eager = build_model(cfg).to(DEV)
    compiled = build_model(cfg).to(DEV)
    compiled.load_state_dict(eager.state_dict())
    compile_model(compiled, fullgraph=True)
    ids = torch.randint(0, 260, (2, 16), device=DEV)
    with fused.use_fused(False):
        ref = _run(eager, ids)
    with fused.use_fused(FORCE):
        out = _run(compiled, ids)
    _assert_same(out, ref)
    assert set(calls) == {"norm", "glu", "rotary"}


@pytest.mark.parametrize(
    ("spec", "kernels"),
    [
        # its q, k and v convolution's outputs written apart (the default, at 32-channel blocks so that the debug
        # widths split; the joined output's ops trace through fakes checked in test_ops_conv_triton.py)
        ("gated-deltanet:debug:split", {"linear_recurrence_chunk_bwd", "causal_conv1d_split_bwd"}),
        pytest.param(  # GLA has no short convolutions; its kernels' calls trace as Gated DeltaNet's do
            "gla:debug",
            {"linear_recurrence_chunk_bwd", "fused_log_sigmoid_decay_fwd"},
            marks=pytest.mark.skipif(not CUDA, reason="on the CPU one compiled model covers the mechanism"),
        ),
    ],
)
def test_compiled_linear_model_equals_eager(spec, kernels, monkeypatch):
    # A linear model compiled block by block (fullgraph) with its linear recurrence, short convolutions, gates and
    # norms on their Triton kernels, its first call compiled: every dispatcher traces (no globals(), no import in
    # the trace), AOT autograd traces every backward through the kernels' custom ops (a kernel launched on a traced
    # tensor fails), and the compiled model computes what the eager one does.
    from effarch.layers.linear_mixer import LinearMixer

    monkeypatch.setattr(LinearMixer, "backend", "triton")
    from effarch.ops import conv, linear

    recurrences = []
    real = custom_op.KernelCall.__call__

    def spy(kernel, *args):
        if kernel.name.startswith(("effarch::linear_recurrence", "effarch::causal_conv1d", "effarch::fused_log")):
            recurrences.append(kernel.name)
        return real(kernel, *args)

    monkeypatch.setattr(custom_op.KernelCall, "__call__", spy)
    monkeypatch.setattr(conv, "_on_gpu", lambda x: True)  # the short convolution's kernel on the CPU too
    for module in (conv, linear):  # as in a fresh process: compile_model loads the kernel modules before any trace
        monkeypatch.setattr(module, "_triton", None)
    from effarch.ops.conv import kernels as conv_kernels

    monkeypatch.setattr(conv_kernels, "SPLIT_OUTPUTS", spec.endswith(":split"))
    if spec.endswith(":split"):
        spec = spec.removesuffix(":split")
        for name, value in (("BC", 32), ("DZ_TILE", (16, 32))):
            monkeypatch.setattr(conv_kernels, name, value)
    cfg = preset_config(spec)
    cfg = dataclasses.replace(cfg, layers=cfg.layer_names[0])  # one block: one graph to compile
    torch.manual_seed(0)
    eager = build_model(cfg).to(DEV)
    compiled = build_model(cfg).to(DEV)
    compiled.load_state_dict(eager.state_dict())
    # On the CPU the trace is what is under test: inductor's C++ code generation would add half a minute.
    compile_model(compiled, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    ids = torch.randint(0, 260, (2, 40), device=DEV)
    with fused.use_fused(FORCE):
        out = _run(compiled, ids)
        ref = _run(eager, ids)
    _assert_same(out, ref)
    assert {f"effarch::{k}" for k in kernels} <= set(recurrences)


def test_switch_function():
    f32 = torch.float32
    with fused.use_fused(False):
        assert not fused.enabled("cuda", f32)
        with fused.use_fused(True):
            assert fused.enabled(torch.device("cuda"), f32) == fused.HAS_TRITON
            assert fused.enabled("cuda", torch.bfloat16) == fused.HAS_TRITON
            assert not fused.enabled("cuda", torch.float64)  # no kernel dtype: always PyTorch
            assert not fused.enabled("cpu", f32)  # a CPU tensor takes PyTorch unless forced
            with fused.use_fused("force"):
                assert fused.enabled("cpu", f32) and not fused.enabled("cpu", torch.float64)
            assert not fused.enabled("cpu", f32)
        assert not fused.enabled("cuda", f32)  # the context restored the choice before it
    fused.use_fused(False)  # a plain call holds until changed
    assert not fused.enabled("cuda", f32)
    with pytest.raises(ValueError, match="use_fused mode='yes'"):
        fused.use_fused("yes")


def test_switch_on_keeps_cpu_model_on_pytorch():
    torch.manual_seed(0)
    model = build_model("transformer:debug")
    ids = torch.randint(0, 260, (2, 9))
    with fused.use_fused(True), _RecordOps() as rec:
        _run(model, ids)
    assert rec.names == set()


def test_environment_variable(monkeypatch):
    monkeypatch.setenv(fused.ENV_VAR, "0")
    fused.use_fused(None)  # back to what the environment says
    assert not fused.enabled("cuda", torch.float32)
    monkeypatch.setenv(fused.ENV_VAR, "1")
    fused.use_fused(None)
    assert fused.enabled("cuda", torch.float32) == fused.HAS_TRITON
    monkeypatch.setenv(fused.ENV_VAR, "maybe")
    with pytest.raises(ValueError, match="EFFARCH_FUSED='maybe'"):
        fused.use_fused(None)


SWITCHES = (
    "EFFARCH_FUSED",
    "EFFARCH_CONV_TRITON",
    "EFFARCH_GATED_NORM_TRITON",
    "EFFARCH_KEEP_STATES",
    "EFFARCH_CONV_SPLIT",
)


@pytest.mark.parametrize("value", [None, "0", "1"])
def test_switches_read_at_import(value):
    """The environment switches, read at import (one fresh process per setting, all of them set alike): the fused
    kernels, the short-convolution kernel, the gated per-head norm, the kept chunk states and the joined
    convolution's outputs written apart are on unless their variable says 0 (the fused kernels also need Triton)."""
    code = (
        "import torch\n"
        "from effarch.ops import conv, fused\n"
        "from effarch.ops.conv import kernels\n"
        "from effarch.ops.linear.triton import launch\n"
        "print(fused.enabled('cuda', torch.float32), conv.AUTO_TRITON, fused.GATED_NORM_ON, launch.SAVE_STATES,"
        " kernels.SPLIT_OUTPUTS)"
    )
    env = {k: v for k, v in os.environ.items() if k not in SWITCHES}
    if value is not None:
        env.update(dict.fromkeys(SWITCHES, value))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    on = value != "0"
    assert r.stdout.split() == [str(on and fused.HAS_TRITON), *[str(on)] * 4]


@pytest.mark.parametrize("spec", ["gated-deltanet:debug"])  # DeltaNet's features are the same code
def test_delta_mixers_run_their_three_convolutions_as_one(spec, monkeypatch):
    """A delta mixer's q, k and v come from one product and pass one short convolution side by side in training:
    one kernel call each way per layer (not three), its outputs written apart, with the PyTorch path's values and
    gradients. (Calls that carry
    a state run them one by one; the mixers' tests check a whole sequence against one continued in pieces.)"""
    from effarch.ops import conv
    from effarch.ops.conv import kernels

    monkeypatch.setattr(conv, "_on_gpu", lambda x: True)
    monkeypatch.setattr(kernels, "SPLIT_OUTPUTS", True)
    monkeypatch.setattr(kernels, "BC", 32)  # channel blocks that divide q, k and v at the debug size
    monkeypatch.setattr(kernels, "DZ_TILE", (16, 32))
    calls = []
    real = custom_op.KernelCall.__call__

    def spy(kernel, *args):
        if kernel.name.startswith("effarch::causal_conv1d"):
            calls.append(kernel.name.split("::")[-1].split(".")[0])
        return real(kernel, *args)

    monkeypatch.setattr(custom_op.KernelCall, "__call__", spy)
    cfg = preset_config(spec)
    torch.manual_seed(0)
    model = build_model(cfg).to(DEV)
    ids = torch.randint(0, cfg.vocab_size, (2, 19), device=DEV)
    with fused.use_fused(FORCE):
        out = _run(model, ids)
    mixer = next(m for m in model.modules() if hasattr(m, "convs") and len(m.convs) == 3)
    # outputs written apart (q, k, v contiguous) when the widths are whole channel blocks, as at this size
    assert kernels.splitable(tuple(c.weight.shape[0] for c in mixer.convs.values()))
    names = ["causal_conv1d_split_fwd", "causal_conv1d_split_bwd"]
    assert sorted(calls) == sorted(names * len(cfg.layer_names))
    with fused.use_fused(False):
        ref = _run(model, ids)
    _assert_same(out, ref)
