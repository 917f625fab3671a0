"""Triton kernels of the linear recurrence against the token-by-token reference.

On a machine without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1) at tiny shapes
(T <= 40, H <= 2, K = V = 16), float32: outputs, final states and every gradient within rel 1e-5 of the
reference (float32 rounding only; the fixed per-head decay's gradient sums every token's term and gets
2e-5). Every buffer the kernels fill starts as NaN (launch.POISON), so an element no kernel wrote fails.
On CUDA: bfloat16 at real shapes within rel 1e-2 of the float32 chunked form (3e-2 for the additive
rule's decay gradient, see the test), float32 within 1e-4 of the reference.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err, spy_launches
from triton_mode import CUDA, fresh_process_only, restore_environment, run_file_in_fresh_process  # noqa: F401

pytest.importorskip("triton")

from effarch.ops.linear import linear_recurrence_chunked, linear_recurrence_reference  # noqa: E402
from effarch.ops.linear.triton import (  # noqa: E402
    backward,
    bwd_kernels,
    fwd_kernels,
    launch,
    linear_recurrence_step_triton,
    linear_recurrence_triton,
    ops,
    triton_supports,
)

DEV = "cuda" if CUDA else "cpu"
CASES = {  # id: (rule, decay kind)
    "linear": ("additive", None),
    "fixed": ("additive", "fixed"),
    "scalar": ("additive", "scalar"),
    "per_key": ("additive", "per_key"),
    "delta": ("delta", None),
    "gated_delta": ("delta", "scalar"),
}
TOL = {"fixed": 2e-5}  # its gradient is a sum over every token: more float32 rounding


def test_in_fresh_process():
    run_file_in_fresh_process(__file__)


@pytest.fixture(autouse=True)
def _poison_and_chunk(monkeypatch):
    monkeypatch.setattr(launch, "POISON", True)
    if not CUDA:
        monkeypatch.setattr(ops, "CHUNK", 32)  # two sub-blocks per chunk, several chunks at T <= 40


def make(rule, decay, B, T, H, K, V, dtype=torch.float32, n_seq=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    kw = {"rule": rule}
    if decay == "fixed":
        kw["log_decay"] = -torch.rand(H, generator=g)
    elif decay == "scalar":
        kw["log_decay"] = F.logsigmoid(r(B, T, H) + 2)
    elif decay == "per_key":
        kw["log_decay"] = F.logsigmoid(r(B, T, H, K) + 2)
    if rule == "delta":
        k = F.normalize(k, dim=-1)
        kw["beta"] = torch.rand(B, T, H, generator=g)
    kw["initial_state"] = r(n_seq or B, H, K, V)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    return q.to(DEV), k.to(DEV), v.to(DEV), {n: x.to(DEV) if isinstance(x, torch.Tensor) else x for n, x in kw.items()}


def outputs_and_grads(fn, q, k, v, kw, cu=None, seed=1):
    """(o, final, *grads of every tensor input) for a random linear function of o and the final state."""
    leaves = {"q": q, "k": k, "v": v, **{n: x for n, x in kw.items() if isinstance(x, torch.Tensor)}}
    leaves = {n: x.detach().clone().requires_grad_() for n, x in leaves.items()}
    extra = {n: x for n, x in leaves.items() if n not in ("q", "k", "v")}
    o, f = fn(leaves["q"], leaves["k"], leaves["v"], **extra, rule=kw["rule"], output_final_state=True, cu_seqlens=cu)
    g = torch.Generator().manual_seed(seed)
    do, df = torch.randn(o.shape, generator=g).to(DEV), torch.randn(f.shape, generator=g).to(DEV)
    grads = torch.autograd.grad((o.float() * do).sum() + (f * df).sum(), list(leaves.values()))
    return {"o": o, "final": f, **{f"d{n}": x for n, x in zip(leaves, grads)}}


def assert_all_close(ours, ref, tol, tol_by_name=None):
    for name in ref:
        assert torch.isfinite(ours[name]).all(), f"{name} has non-finite values"
        err, bound = rel_err(ours[name], ref[name]), (tol_by_name or {}).get(name, tol)
        assert err < bound, f"{name}: relative error {err:.2e} >= {bound:.0e}"


# ----------------------------------------------------------------------------- chunked kernels, CPU interpreter


@pytest.mark.skipif(CUDA, reason="interpreter tests; the CUDA tests below cover the GPU")
@pytest.mark.parametrize("case", list(CASES))
def test_packed_sequences_match_reference(case):
    """Packed varlen batch (an empty sequence, lengths not multiples of the chunk), initial states,
    outputs, final states and all gradients."""
    rule, decay = CASES[case]
    cu = torch.tensor([0, 5, 5, 30, 37])
    q, k, v, kw = make(rule, decay, 1, 37, 2, 16, 16, n_seq=4)
    ours = outputs_and_grads(linear_recurrence_triton, q, k, v, kw, cu)
    ref = outputs_and_grads(linear_recurrence_reference, q, k, v, kw, cu)
    assert_all_close(ours, ref, TOL.get(case, 1e-5))


@pytest.mark.skipif(CUDA, reason="interpreter tests; the CUDA tests below cover the GPU")
@pytest.mark.parametrize("case", ["per_key", "gated_delta"])
@pytest.mark.parametrize("used", ["o", "final"])
def test_gradient_through_one_output_alone(case, used):
    """A loss of o alone or of the final state alone: the other output's gradient arrives as None (no zero tensor
    is made for it, nor for the states kept for the backward), and the gradients equal the reference's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Zeros(TorchDispatchMode):
        made = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.made += func.overloadpacket.__name__ in ("zeros", "zeros_like", "new_zeros") and not (
                used == "final" and func.overloadpacket.__name__ == "zeros_like"  # o's gradient, needed then
            )
            return func(*args, **(kwargs or {}))

    rule, decay = CASES[case]
    q, k, v, kw = make(rule, decay, 2, 37, 2, 16, 16, seed=5)
    grads = {}
    for name, fn in (("ours", linear_recurrence_triton), ("ref", linear_recurrence_reference)):
        leaves = [
            x.detach().clone().requires_grad_() for x in (q, k, v, kw["log_decay"], kw.get("beta")) if x is not None
        ]
        extra = dict(kw, log_decay=leaves[3], **({"beta": leaves[4]} if "beta" in kw else {}))
        o, f = fn(*leaves[:3], **extra, output_final_state=True)
        w = torch.randn((o if used == "o" else f).shape, generator=torch.Generator().manual_seed(9)).to(DEV)
        loss = ((o if used == "o" else f).float() * w).sum()
        with Zeros() as zeros:
            got = torch.autograd.grad(loss, leaves, allow_unused=True)  # q does not reach the final state
        grads[name] = [torch.zeros_like(x) if g is None else g for g, x in zip(got, leaves)]
        if name == "ours":
            assert zeros.made == 0
    for a, b in zip(grads["ours"], grads["ref"]):
        assert rel_err(a, b) < 1e-5


@pytest.mark.skipif(CUDA, reason="interpreter tests; the CUDA tests below cover the GPU")
@pytest.mark.parametrize("case", ["scalar", "per_key", "gated_delta"])
@pytest.mark.parametrize("grad", [True, False])
def test_key_groups_match_the_reference(case, grad):
    """q, k with one head serving two value heads (Mamba2's shared B and C): outputs, states and gradients
    (a group's gradient sums over its heads); without gradients short inputs take the token-by-token kernel."""
    rule, decay = CASES[case]
    q, k, v, kw = make(rule, decay, 2, 37 if grad else 5, 2, 16, 16)
    q, k = q[:, :, :1].contiguous(), k[:, :, :1].contiguous()
    if rule == "delta":
        k = F.normalize(k, dim=-1)
    if grad:
        ours = outputs_and_grads(linear_recurrence_triton, q, k, v, kw)
        ref = outputs_and_grads(linear_recurrence_reference, q, k, v, kw)
        assert ours["dq"].shape == q.shape and ours["dk"].shape == k.shape
        assert_all_close(ours, ref, 1e-5)
        return
    with torch.no_grad():
        o, f = linear_recurrence_triton(q, k, v, **kw, output_final_state=True)
        o_ref, f_ref = linear_recurrence_reference(q.expand_as(v[..., :16]), k.expand_as(v[..., :16]), v, **kw,
                                                   output_final_state=True)  # fmt: skip
        state = kw["initial_state"].clone()
        o_step = linear_recurrence_step_triton(q, k, v, state, **{n: x for n, x in kw.items() if n != "initial_state"})
    assert_all_close({"o": o, "final": f, "o_step": o_step, "state": state},
                     {"o": o_ref, "final": f_ref, "o_step": o_ref, "state": f_ref}, 1e-5)  # fmt: skip


@pytest.mark.skipif(CUDA, reason="interpreter tests; the CUDA tests below cover the GPU")
@pytest.mark.parametrize(("case", "chunk"), [("per_key", 64), ("gated_delta", 64), ("scalar", 16), ("delta", 16)])
def test_dense_batch_other_chunk_sizes(case, chunk, monkeypatch):
    """B = 2 without cu_seqlens; chunk 64 (four sub-blocks, one partial chunk) and 16 (one sub-block)."""
    monkeypatch.setattr(ops, "CHUNK", chunk)
    rule, decay = CASES[case]
    q, k, v, kw = make(rule, decay, 2, 40, 1, 16, 16, seed=2)
    ours = outputs_and_grads(linear_recurrence_triton, q, k, v, kw)
    ref = outputs_and_grads(linear_recurrence_reference, q, k, v, kw)
    assert_all_close(ours, ref, 1e-5)


@pytest.mark.skipif(CUDA, reason="interpreter tests; the CUDA tests below cover the GPU")
@pytest.mark.parametrize("case", ["scalar", "per_key", "gated_delta"])
def test_wide_heads_split_into_key_and_value_blocks(case):
    """K = 128 at one sequence and head: the state passes of the additive rule with decay cut the state into
    blocks of 32 keys and 16 values, and its dq / dk run in two blocks of 64 keys (float32 inputs here; on the
    GPU with bf16 inputs these splits are taken where the products are tf32), as for one long sequence."""
    rule, decay = CASES[case]
    q, k, v, kw = make(rule, decay, 1, 70, 1, 128, 32, seed=22)
    assert launch.state_blocks(128, 32, 1, split=rule != "delta") == ((128, 32) if rule == "delta" else (32, 16))
    ours = outputs_and_grads(linear_recurrence_triton, q, k, v, kw)
    ref = outputs_and_grads(linear_recurrence_reference, q, k, v, kw)
    assert_all_close(ours, ref, 1e-5)


@pytest.mark.skipif(CUDA, reason="interpreter tests; the CUDA tests below cover the GPU")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", ["packed", "wide"])
def test_two_phase_state_passes_match_reference(case, shape, monkeypatch):
    """launch.STATE_PASS = "two_phase": every chunk's own term first, then a pass that decays and adds (the
    delta rule's reverse pass reads its q^T dO term the same way). Packed: an empty sequence (its chunk has no
    last token) and lengths not multiples of the chunk; wide: K = 128 in 16 x 16 scan blocks."""
    monkeypatch.setattr(launch, "STATE_PASS", "two_phase")
    rule, decay = CASES[case]
    if shape == "packed":
        cu = torch.tensor([0, 5, 5, 30, 37])
        q, k, v, kw = make(rule, decay, 1, 37, 2, 16, 16, n_seq=4, seed=5)
    else:
        cu = None
        q, k, v, kw = make(rule, decay, 1, 70, 1, 128, 32, seed=23)
        assert launch.scan_blocks(128, 32, 1) == (16, 16)
    ours = outputs_and_grads(linear_recurrence_triton, q, k, v, kw, cu)
    ref = outputs_and_grads(linear_recurrence_reference, q, k, v, kw, cu)
    assert_all_close(ours, ref, TOL.get(case, 1e-5))


def check_bf16_on_the_interpreter(case: str, H: int, K: int, seed: int) -> None:
    """bf16 inputs (70 tokens, V = 32, a small initial state) against the float32 reference, to bf16 accuracy."""
    rule, decay = CASES[case]
    q, k, v, kw = make(rule, decay, 1, 70, H, K, 32, dtype=torch.bfloat16, seed=seed)
    kw["initial_state"] = kw["initial_state"] * 0.1
    ours = outputs_and_grads(linear_recurrence_triton, q, k, v, kw)
    ref = outputs_and_grads(linear_recurrence_reference, q.float(), k.float(), v.float(), kw)
    assert_all_close(ours, ref, 2e-2)


def check_values_40_wide(case: str, seed: int) -> None:
    """Float32 inputs with V = 40 (value blocks of 16 or 32 end partly masked; 2 x 45 tokens, 2 heads of 16 keys)
    against the reference."""
    rule, decay = CASES[case]
    q, k, v, kw = make(rule, decay, 2, 45, 2, 16, 40, seed=seed)
    ours = outputs_and_grads(linear_recurrence_triton, q, k, v, kw)
    ref = outputs_and_grads(linear_recurrence_reference, q, k, v, kw)
    assert_all_close(ours, ref, TOL.get(case, 1e-5))


def packed_or_dense(case: str, packed: bool, L: int, K: int, seed: int):
    """(q, k, v, kw, cu_seqlens) of 2 heads, V = 16: packed, sequences of 5, 0, 2L - 5 and L // 4 + 2 tokens
    (an empty one, lengths not multiples of the chunk); dense, 2 sequences of 2L tokens."""
    rule, decay = CASES[case]
    if not packed:
        return (*make(rule, decay, 2, 2 * L, 2, K, 16, seed=seed), None)
    lengths = [5, 0, 2 * L - 5, L // 4 + 2]
    cu = torch.tensor([0, *itertools.accumulate(lengths)])
    return (*make(rule, decay, 1, int(cu[-1]), 2, K, 16, n_seq=4, seed=seed), cu)


@pytest.mark.skipif(CUDA, reason="interpreter tests; the CUDA tests below cover the GPU")
@pytest.mark.parametrize("case", ["delta", "gated_delta"])
@pytest.mark.parametrize("buffers", ["float32", "input"])
def test_delta_gradient_buffers_setting(case, buffers, monkeypatch):
    """backward.DELTA_GRAD_BUFFERS with bf16 inputs: the gradients passed between the delta rule's backward kernels
    (dU, dW, dk's first part) in float32 or in bf16; both match the float32 reference to bf16 accuracy, and the
    buffers are allocated in the dtype asked for."""
    monkeypatch.setattr(backward, "DELTA_GRAD_BUFFERS", buffers)
    seen = []
    spy_launches(monkeypatch, bwd_kernels, "wy_bwd_kernel", lambda a: seen.append((a[5].dtype, a[6].dtype, a[7].dtype)))
    check_bf16_on_the_interpreter(case, 2, 32, seed=27)
    assert seen == [(torch.bfloat16 if buffers == "input" else torch.float32,) * 3]


def setting_forms_agree(monkeypatch, module, name: str, values: tuple, case: str, inputs: tuple, bad=None) -> None:
    """Outputs and gradients with module.name set to each of `values` (old, new) on inputs (q, k, v, kw, cu):
    the two equal to float32 rounding, the new one equal to the reference; `bad`, a misspelt value, refused in one
    sentence naming the valid ones."""
    results = {}
    for value in values:
        monkeypatch.setattr(module, name, value)
        results[value] = outputs_and_grads(linear_recurrence_triton, *inputs)
    old, new = values
    assert_all_close(results[new], results[old], 1e-5)
    assert_all_close(results[new], outputs_and_grads(linear_recurrence_reference, *inputs), TOL.get(case, 1e-5))
    if bad is not None:
        monkeypatch.setattr(module, name, bad)
        with pytest.raises(ValueError, match=f"{name} is '{bad}'; valid: .*'{new}'"):
            outputs_and_grads(linear_recurrence_triton, *inputs)


@pytest.mark.skipif(CUDA, reason="interpreter tests; the CUDA tests below cover the GPU")
# packed batches for every decay kind, dense ones where the per-key pass differs
@pytest.mark.parametrize(("case", "packed"), [("fixed", True), ("scalar", True), ("per_key", True), ("per_key", False)])
def test_decay_suffix_sums_kernel_matches_the_pytorch_form(case, packed, monkeypatch):
    """backward.DECAY_SUFFIX_KERNEL: the decay gradient's suffix sums in one Triton pass over each sequence's chunks
    (K = 40 in blocks of 32 keys) give the gradients of PyTorch's reverse cumsum to float32 rounding, and the
    reference's; packed: an empty sequence and lengths not multiples of the chunk, with the final state's gradient
    as each sequence's starting carry."""
    monkeypatch.setattr(backward, "DECAY_GRAD_LATER", "suffix")
    monkeypatch.setattr(backward, "DECAY_SUFFIX_BD", 32)
    q, k, v, kw, cu = packed_or_dense(case, packed, 35, 40, seed=30)
    launches = []
    spy_launches(monkeypatch, bwd_kernels, "suffix_sum_kernel", lambda a: launches.append(a[-2]))  # BD
    results = {}
    for on in (False, True):
        monkeypatch.setattr(backward, "DECAY_SUFFIX_KERNEL", on)
        results[on] = outputs_and_grads(linear_recurrence_triton, q, k, v, kw, cu)
    assert launches == [32 if case == "per_key" else 16]
    assert_all_close(results[True], results[False], 1e-5)
    ref = outputs_and_grads(linear_recurrence_reference, q, k, v, kw, cu)
    assert_all_close(results[True], ref, TOL.get(case, 1e-5))


@pytest.mark.skipif(CUDA, reason="interpreter tests; the CUDA tests below cover the GPU")
@pytest.mark.parametrize(("block", "warps", "packed"), [(8, 1, False), (16, 2, True)])
def test_decay_suffix_pass_in_narrower_key_blocks(block, warps, packed, monkeypatch):
    """backward.DECAY_SUFFIX_BD / DECAY_SUFFIX_WARPS: the per-key decay gradient's suffix pass in blocks of 8 or 16
    keys (K = 40: a partial last block) gives the results of blocks of 32 to float32 rounding, and the
    reference's; packed: an empty sequence and lengths not multiples of the chunk."""
    monkeypatch.setattr(backward, "DECAY_GRAD_LATER", "suffix")
    monkeypatch.setattr(backward, "DECAY_SUFFIX_WARPS", warps)
    q, k, v, kw, cu = packed_or_dense("per_key", packed, 35, 40, seed=34)
    grids = []
    spy_launches(monkeypatch, bwd_kernels, "suffix_sum_kernel", grids.append, grid=True)
    setting_forms_agree(monkeypatch, backward, "DECAY_SUFFIX_BD", (32, block), "per_key", (q, k, v, kw, cu))
    assert [g[0] for g in grids] == [2, -(-40 // block)]  # key blocks per sequence and head


@pytest.mark.skipif(CUDA, reason="interpreter tests; the CUDA tests below cover the GPU")
@pytest.mark.parametrize(("case", "packed"), [("fixed", True), ("scalar", True), ("per_key", True), ("per_key", False)])
def test_decay_gradient_later_share_from_the_states(case, packed, monkeypatch):
    """backward.DECAY_GRAD_LATER = "state": the later chunks' share of the decay gradient taken from the state
    leaving each chunk and its gradient gives the decay gradient of the sequence-long suffix sums (to float32
    rounding) and of the reference; packed: an empty sequence, lengths not multiples of the chunk, the final
    state's gradient entering through each sequence's last chunk. No suffix pass runs."""
    q, k, v, kw, cu = packed_or_dense(case, packed, 35, 40, seed=32)
    launches = []
    spy_launches(monkeypatch, bwd_kernels, "suffix_sum_kernel", lambda a: launches.append("sequence"))
    spy_launches(monkeypatch, bwd_kernels, "chunk_suffix_kernel", lambda a: launches.append("chunk"))
    monkeypatch.setattr(backward, "DECAY_SUFFIX_KERNEL", True)
    setting_forms_agree(
        monkeypatch, backward, "DECAY_GRAD_LATER", ("suffix", "state"), case, (q, k, v, kw, cu), "chunks"
    )
    assert launches == ["sequence"] + (["chunk"] if case == "per_key" else [])


def test_decay_gradient_forms_chosen_by_decay_kind(monkeypatch):
    """backward.DECAY_GRAD_LATER / DECAY_GRAD_DOTS = "auto": the later share from the states with input-dtype
    products for scalar decay, the suffix sums with tf32 products per key; explicit values hold for both; a
    misspelt value is refused in one sentence naming the valid ones."""
    monkeypatch.setattr(backward, "DECAY_GRAD_LATER", "auto")
    monkeypatch.setattr(backward, "DECAY_GRAD_DOTS", "auto")
    assert backward.decay_grad_forms(1) == (True, "input")
    assert backward.decay_grad_forms(2) == (False, "tf32")
    monkeypatch.setattr(backward, "DECAY_GRAD_LATER", "state")
    assert backward.decay_grad_forms(2) == (True, "input")
    monkeypatch.setattr(backward, "DECAY_GRAD_DOTS", "tf32")
    assert backward.decay_grad_forms(1) == (True, "tf32")
    monkeypatch.setattr(backward, "DECAY_GRAD_LATER", "suffix")
    monkeypatch.setattr(backward, "DECAY_GRAD_DOTS", "input")
    assert backward.decay_grad_forms(1) == (False, "input")
    monkeypatch.setattr(backward, "DECAY_GRAD_DOTS", "bf16")
    with pytest.raises(ValueError, match="valid: 'auto', 'tf32', 'input'"):
        backward.decay_grad_forms(1)


@pytest.mark.skipif(CUDA, reason="interpreter tests; the CUDA tests below cover the GPU")
def test_fixed_decay_gradient_holds_bf16_accuracy(monkeypatch):
    """One decay per head with bf16 inputs (2 x 256 tokens, chunks of 64): its gradient sums every token's share,
    which the later chunks' share from the states keeps within 1e-2 of the float32 reference (the sequence-long
    suffix sums of q dq - k dk left 8e-2 here)."""
    monkeypatch.setattr(ops, "CHUNK", 64)
    rule, decay = CASES["fixed"]
    q, k, v, kw = make(rule, decay, 2, 256, 2, 32, 32, dtype=torch.bfloat16, seed=1)
    kw["initial_state"] = kw["initial_state"] * 0.1
    ours = outputs_and_grads(linear_recurrence_triton, q, k, v, kw)
    ref = outputs_and_grads(linear_recurrence_reference, q.float(), k.float(), v.float(), kw)
    assert_all_close(ours, ref, 1e-2)


@pytest.mark.skipif(CUDA, reason="interpreter tests; the CUDA tests below cover the GPU")
@pytest.mark.parametrize("case", ["linear", "scalar", "per_key", "delta", "gated_delta"])
@pytest.mark.parametrize("state_pass", ["fused", "two_phase"])
@pytest.mark.parametrize("buffer", ["float32", "input"])
def test_state_gradients_stored_in_the_buffer_dtype(case, state_pass, buffer, monkeypatch):
    """backward.STATE_GRAD_BUFFER with bf16 inputs: the reverse pass stores each chunk's dS in float32 or in bf16
    (the two-phase pass then takes its chunk terms from a float32 buffer of their own, otherwise from dS itself);
    gradients match the float32 reference to bf16 accuracy."""
    monkeypatch.setattr(backward, "STATE_GRAD_BUFFER", buffer)
    monkeypatch.setattr(launch, "STATE_PASS", state_pass)
    seen = []
    spy_launches(monkeypatch, bwd_kernels, "state_bwd_kernel", lambda a: seen.append((a[5].dtype, a[9].dtype)))
    check_bf16_on_the_interpreter(case, 2, 32, seed=31)
    dS = torch.bfloat16 if buffer == "input" else torch.float32
    assert seen == [(dS, torch.float32 if state_pass == "two_phase" else dS)]  # dS, D


@pytest.mark.skipif(CUDA, reason="interpreter tests; the CUDA tests below cover the GPU")
@pytest.mark.parametrize("case", ["delta", "gated_delta"])
def test_delta_reverse_pass_in_narrower_value_blocks(case, monkeypatch):
    """backward.DELTA_STATE_BWD_BV = 16: the delta rule's reverse state pass in blocks of 16 value columns (V = 40:
    the last block partly masked) matches the reference, float32 and bf16 inputs with tf32 products; with bf16
    products (STATE_BWD_DOTS = "input") it keeps blocks of 32."""
    monkeypatch.setattr(backward, "DELTA_STATE_BWD_BV", 16)
    blocks = []
    spy_launches(monkeypatch, bwd_kernels, "state_bwd_kernel", lambda a: blocks.append(a[18]))  # BV
    check_values_40_wide(case, seed=28)
    assert blocks == [16]
    for dots, width in (("tf32", 16), ("input", 32)):
        monkeypatch.setattr(backward, "STATE_BWD_DOTS", dots)
        blocks.clear()
        check_bf16_on_the_interpreter(case, 1, 32, seed=29)
        assert blocks == [width]


@pytest.mark.skipif(CUDA, reason="interpreter tests; the CUDA tests below cover the GPU")
@pytest.mark.parametrize(
    ("case", "K", "state_pass"),
    [
        ("delta", 40, "fused"),
        ("gated_delta", 40, "two_phase"),
        ("delta", 128, "two_phase"),
        ("gated_delta", 128, "fused"),
    ],
)
def test_delta_reverse_pass_in_key_halves(case, K, state_pass, monkeypatch):
    """backward.DELTA_STATE_BWD_SPLIT: the delta rule's reverse state pass with the state gradient as two tiles of
    64 keys (`delta_state_bwd_kernel`; one, masked, at K = 40), its own value blocks (16 of V = 40: the last partly
    masked), with each chunk's own term formed before the pass (two phases) or inside it, matches the reference:
    packed sequences with initial states and final-state gradients in float32, and bf16 inputs."""
    monkeypatch.setattr(backward, "DELTA_STATE_BWD_SPLIT", True)
    monkeypatch.setattr(backward, "DELTA_SPLIT_BV", 16)
    monkeypatch.setattr(launch, "STATE_PASS", state_pass)
    split, whole = [], []
    spy_launches(monkeypatch, bwd_kernels, "delta_state_bwd_kernel", split.append)
    spy_launches(monkeypatch, bwd_kernels, "state_bwd_kernel", whole.append)
    rule, decay = CASES[case]
    q, k, v, kw = make(rule, decay, 1, 75, 2, K, 40, n_seq=3, seed=41)
    cu = torch.tensor([0, 9, 40, 75])
    ours = outputs_and_grads(linear_recurrence_triton, q, k, v, kw, cu)
    ref = outputs_and_grads(linear_recurrence_reference, q, k, v, kw, cu)
    assert_all_close(ours, ref, 1e-5)
    check_bf16_on_the_interpreter(case, 1, K, seed=42)
    assert len(split) == 2 and not whole


@pytest.mark.skipif(CUDA, reason="interpreter tests; the CUDA tests below cover the GPU")
@pytest.mark.parametrize("case", ["linear", "scalar", "per_key", "delta", "gated_delta"])
def test_dq_dk_kernel_value_steps(case, monkeypatch):
    """backward.DQK_BV: the dq / dk / dW kernel's loop over V in steps of 16 (V = 40: three steps, the last partly
    masked) matches the reference."""
    monkeypatch.setattr(backward, "DQK_BV", 16)
    steps = []
    spy_launches(monkeypatch, bwd_kernels, "dqk_kernel", lambda a: steps.append(a[23]))  # BV
    check_values_40_wide(case, seed=44)
    assert steps == [16]


@pytest.mark.skipif(CUDA, reason="interpreter tests; the CUDA tests below cover the GPU")
@pytest.mark.parametrize("case", ["delta", "gated_delta"])
def test_delta_reverse_pass_in_key_halves_only_up_to_128_keys(case, monkeypatch):
    """Heads wider than 128 keys keep the one-tile pass whatever DELTA_STATE_BWD_SPLIT says."""
    monkeypatch.setattr(backward, "DELTA_STATE_BWD_SPLIT", True)
    split = []
    spy_launches(monkeypatch, bwd_kernels, "delta_state_bwd_kernel", split.append)
    rule, decay = CASES[case]
    q, k, v, kw = make(rule, decay, 1, 20, 1, 160, 16, seed=43)
    ours = outputs_and_grads(linear_recurrence_triton, q, k, v, kw)
    ref = outputs_and_grads(linear_recurrence_reference, q, k, v, kw)
    assert_all_close(ours, ref, 1e-5)
    assert split == []


@pytest.mark.skipif(CUDA, reason="interpreter tests; the CUDA tests below cover the GPU")
@pytest.mark.parametrize("dots", ["input", "decay"])
def test_dv_products_setting(dots, monkeypatch):
    """backward.DV_DOTS with bf16 inputs and per-key decay (whose decay-gradient kernels take tf32 products):
    "input" runs the dv kernel with bf16 products, "decay" with tf32; both match the float32 reference to bf16
    accuracy."""
    monkeypatch.setattr(backward, "DV_DOTS", dots)
    seen = []
    spy_launches(monkeypatch, bwd_kernels, "dv_local_kernel", lambda a: seen.append(a[-2]))  # DTC
    assert backward.decay_grad_forms(2)[1] == "tf32"
    check_bf16_on_the_interpreter("per_key", 1, 128, seed=25)
    assert seen == [3 if dots == "input" else 4]  # 3: the interpreter's emulated bf16 products


@pytest.mark.skipif(CUDA, reason="interpreter tests; the CUDA tests below cover the GPU")
@pytest.mark.parametrize("case", ["delta", "gated_delta"])
@pytest.mark.parametrize("dots", ["input", "tf32"])
def test_delta_dq_dk_products_setting(case, dots, monkeypatch):
    """backward.DELTA_DQK_DOTS with bf16 inputs at K = 128: "tf32" runs the delta rule's dq / dk / dW kernel with
    tf32 products (DTC 4) in blocks of 64 keys; both settings match the float32 reference to bf16 accuracy."""
    monkeypatch.setattr(backward, "DELTA_DQK_DOTS", dots)
    seen = []
    spy_launches(monkeypatch, bwd_kernels, "dqk_kernel", lambda a: seen.append((a[-6], a[-1])))  # BK, DTC
    check_bf16_on_the_interpreter(case, 1, 128, seed=24)
    assert seen == [(64, 4 if dots == "tf32" else 3)]  # 3: the interpreter's emulated bf16 products


@pytest.mark.skipif(CUDA, reason="interpreter tests; the CUDA tests below cover the GPU")
# every rule dense; packed batches (one recompute path for all rules) with an additive and a delta rule
@pytest.mark.parametrize(("case", "packed"), [(c, False) for c in CASES] + [("scalar", True), ("delta", True)])
def test_kept_states_spare_the_backward_a_state_pass(case, packed, monkeypatch):
    """launch.SAVE_STATES: the forward keeps the states entering each chunk (dense batches; and the delta rule's W
    and pseudo-values, and a decay's chunk-local cumsum), so the backward runs no state pass, WY kernel or cumsum
    of its own; outputs and gradients are bit for bit those of recomputing. Packed batches recompute as before."""
    q, k, v, kw, cu = packed_or_dense(case, packed, 20, 16, seed=6)
    launches = []
    for name in ("state_fwd_kernel", "delta_prep_kernel", "chunk_cumsum_kernel"):
        spy_launches(monkeypatch, fwd_kernels, name, lambda a, name=name: launches.append(name))
    results = {}
    decayed = kw.get("log_decay") is not None
    for keep in (False, True):
        monkeypatch.setattr(launch, "SAVE_STATES", keep)
        launches.clear()
        results[keep] = outputs_and_grads(linear_recurrence_triton, q, k, v, kw, cu)
        runs = 1 if keep and not packed else 2  # the forward's, and the backward's unless kept
        assert len(launches) == runs * (1 + (CASES[case][0] == "delta") + decayed), launches
    for name in results[False]:
        assert torch.equal(results[True][name], results[False][name]), name
    ref = outputs_and_grads(linear_recurrence_reference, q, k, v, kw, cu)
    assert_all_close(results[True], ref, TOL.get(case, 1e-5))


def test_auto_state_pass_takes_two_phases_for_per_key_decay_and_long_sequences(monkeypatch):
    """STATE_PASS = "auto": two phases for per-key decay's reverse pass at any length (its forward pass as
    GLA_FWD_STATE_PASS says: under "auto" from TWO_PHASE_CHUNKS chunks per sequence); for a scalar decay and the delta rule from TWO_PHASE_CHUNKS chunks per sequence on
    average; never for the additive rule without decay. "fused" and "two_phase" force the choice, anything else is
    refused in one sentence."""
    monkeypatch.setattr(launch, "STATE_PASS", "auto")
    n = launch.TWO_PHASE_CHUNKS
    assert launch.two_phase_pass(2, 4, 4)
    for fwd in ("auto", "fused", "two_phase"):
        monkeypatch.setattr(launch, "GLA_FWD_STATE_PASS", fwd)
        assert launch.two_phase_pass(2, 4, 4, forward=True) == (fwd == "two_phase") and launch.two_phase_pass(2, 4, 4)
        long = launch.two_phase_pass(2, 1, n, forward=True)
        assert long == (fwd != "fused") and launch.two_phase_pass(2, 1, n)
    for gk, delta in ((1, False), (0, True), (1, True)):
        assert not launch.two_phase_pass(gk, 4, 4 * n - 1, delta) and launch.two_phase_pass(gk, 4, 4 * n, delta)
    assert not launch.two_phase_pass(0, 1, 100 * n)
    for forced in ("fused", "two_phase"):
        monkeypatch.setattr(launch, "STATE_PASS", forced)
        got = {
            launch.two_phase_pass(gk, 1, c, d, f)
            for gk in (0, 1, 2)
            for c in (1, 4 * n)
            for d in (False, True)
            for f in (False, True)
        }
        assert got == {forced == "two_phase"}
    monkeypatch.setattr(launch, "STATE_PASS", "two-phase")
    with pytest.raises(ValueError, match="valid: 'auto', 'fused', 'two_phase'"):
        launch.two_phase_pass(1, 1, 1)


@pytest.mark.skipif(CUDA, reason="interpreter tests; the CUDA tests below cover the GPU")
def test_auto_state_pass_runs_two_phases_on_a_long_sequence(monkeypatch):
    """A sequence of TWO_PHASE_CHUNKS chunks or more runs the chunk-term kernel under "auto" and matches the
    reference (scalar decay, lowered threshold to keep the interpreter quick)."""
    monkeypatch.setattr(launch, "STATE_PASS", "auto")
    monkeypatch.setattr(launch, "TWO_PHASE_CHUNKS", 2)
    calls = []
    terms = launch.chunk_terms
    monkeypatch.setattr(launch, "chunk_terms", lambda *a, **kw: calls.append(kw["reverse"]) or terms(*a, **kw))
    rule, decay = CASES["scalar"]
    q, k, v, kw = make(rule, decay, 1, 150, 2, 16, 16, seed=25)
    ours = outputs_and_grads(linear_recurrence_triton, q, k, v, kw)
    ref = outputs_and_grads(linear_recurrence_reference, q, k, v, kw)
    assert_all_close(ours, ref, TOL.get("scalar", 1e-5))
    assert calls == [False, True]


@pytest.mark.skipif(CUDA, reason="interpreter tests; the CUDA tests below cover the GPU")
@pytest.mark.parametrize("case", ["delta", "gated_delta"])
def test_delta_inverse_in_registers_matches_the_memory_form(case, monkeypatch):
    """launch.DELTA_PREP_IN_REGS: the chunk's inverse (I + A)^{-1} built with every 16 x 16 block in registers
    gives the outputs and gradients of the block-row form through memory (to float32 rounding) and of the
    reference; a packed batch ends sequences inside chunks and in every sub-block position."""
    monkeypatch.setattr(ops, "CHUNK", 64)  # four sub-blocks: the register form's only shape
    rule, decay = CASES[case]
    cu = torch.tensor([0, 21, 21, 90, 107])
    q, k, v, kw = make(rule, decay, 1, 107, 2, 16, 16, n_seq=4, seed=26)
    setting_forms_agree(monkeypatch, launch, "DELTA_PREP_IN_REGS", (False, True), case, (q, k, v, kw, cu))


@pytest.mark.skipif(CUDA, reason="interpreter tests; the CUDA tests below cover the GPU")
# each rule with one form of the rest of the inverse and one kind of keys (every pairing took 36 s of the suite)
@pytest.mark.parametrize(("case", "in_regs", "keys"), [("delta", False, "random"), ("gated_delta", True, "alike")])
def test_delta_inverse_by_doubling_matches_substitution(case, in_regs, keys, monkeypatch):
    """launch.DELTA_INVERSE = "doubling": each 16 x 16 diagonal block of (I + A)^{-1} from the inverses of its
    1, 2, 4 and 8-row blocks gives the outputs and gradients of forward substitution and of the reference, in
    either form of the rest of the inverse; "alike": keys all near one direction with beta near 1, so A's entries
    are near 1 and the inverse's entries alternate in sign (the products in between grow, the result does not)."""
    monkeypatch.setattr(ops, "CHUNK", 64)
    monkeypatch.setattr(launch, "DELTA_PREP_IN_REGS", in_regs)
    rule, decay = CASES[case]
    cu = torch.tensor([0, 21, 21, 90, 107])
    q, k, v, kw = make(rule, decay, 1, 107, 2, 16, 16, n_seq=4, seed=33)
    if keys == "alike":
        k = F.normalize(torch.randn(1, 1, 1, 16) + 0.05 * torch.randn_like(k), dim=-1)
        kw["beta"] = 0.9 + 0.1 * kw["beta"]
    inverses = []
    spy_launches(monkeypatch, fwd_kernels, "delta_prep_kernel", lambda a: inverses.append(a[-1]))  # DOUBLING
    inputs = (q, k, v, kw, cu)
    setting_forms_agree(monkeypatch, launch, "DELTA_INVERSE", ("substitution", "doubling"), case, inputs, "newton")
    assert set(inverses) == {False, True} and inverses == sorted(inverses)  # substitution runs, then doubling


def test_scan_blocks_cover_the_state_in_small_tiles():
    """Any block is right for a pass without products; it keeps tiles of at most 1024 entries and splits
    further only while fewer than SCAN_PROGRAMS programs would run."""
    for K, V, n in [(128, 128, 1), (128, 256, 16), (64, 64, 64), (16, 16, 2), (256, 128, 512)]:
        BK, BV = launch.scan_blocks(K, V, n)
        assert BK * BV <= 1024 and BK >= 16 and BV >= 16
        programs = n * -(-K // BK) * -(-V // BV)
        assert programs >= launch.SCAN_PROGRAMS or (BK, BV) == (16, 16)
    assert launch.scan_blocks(128, 128, 4096) == (16, 64)


@pytest.mark.skipif(CUDA, reason="interpreter tests; the CUDA tests below cover the GPU")
# key_block 0 in one block of 40 keys: mild, then strong; key_block 16 "mixed" takes both forms in one call
@pytest.mark.parametrize(("strength", "key_block"), [(1.0, 0), (30.0, 0), ("mixed", 16)])
def test_per_key_decay_mild_and_strong(strength, key_block, monkeypatch):
    """The per-key intra-chunk kernels take one product per sub-block when its decay spans at most SPREAD in
    log space, and the column-by-column form otherwise: log decays of -strength * U(0, 1) per token put
    sub-blocks of 16 tokens on either side (at 30, some keys decay by more than 40 within a sub-block).
    key_block 16: the scores sum over blocks of 16 of the 40 keys, and the backward's programs take 16 keys each
    (the last block partly masked), each block choosing its form by its own keys' spread ("mixed": mild decay on
    the first 16 keys only)."""
    monkeypatch.setattr(ops, "CHUNK", 64)
    monkeypatch.setattr(launch, "GLA_INTRA_BWD_BK", key_block)
    monkeypatch.setattr(launch, "GLA_INTRA_BK", key_block)
    q, k, v, kw = make("additive", "per_key", 2, 70, 2, 40, 16, seed=23)
    scale = torch.full((40,), 30.0) if strength != "mixed" else torch.cat([torch.ones(16), torch.full((24,), 30.0)])
    if strength != "mixed":
        scale.fill_(strength)
    kw["log_decay"] = -scale * torch.rand(kw["log_decay"].shape, generator=torch.Generator().manual_seed(5))
    spread = -kw["log_decay"][:, :16].sum(1).amax(dim=(0, 1))  # one sub-block's span, per key
    assert (spread.max().item() < 40) == (strength == 1.0)
    assert strength != "mixed" or spread[:16].max().item() < 40
    with warnings.catch_warnings():  # no exponent overflows, not even on lanes that are masked afterwards
        warnings.simplefilter("error", RuntimeWarning)
        ours = outputs_and_grads(linear_recurrence_triton, q, k, v, kw)
    ref = outputs_and_grads(linear_recurrence_reference, q, k, v, kw)
    # strong decays: the decay gradient's suffix sums of q dq - k dk hold larger, cancelling terms
    assert_all_close(ours, ref, 1e-5, {"dlog_decay": 2e-5})


@pytest.mark.skipif(CUDA, reason="interpreter tests; the CUDA tests below cover the GPU")
@pytest.mark.parametrize("chunk", [32, 64])
def test_per_key_decay_at_a_key_width_that_is_not_a_power_of_two(chunk, monkeypatch):
    """K = 40, V = 24 (blocks of 64 and 32, partly masked): packed sequences, a partial chunk, every gradient."""
    monkeypatch.setattr(ops, "CHUNK", chunk)
    cu = torch.tensor([0, 19, 70, 83])
    q, k, v, kw = make("additive", "per_key", 1, 83, 2, 40, 24, n_seq=3, seed=21)
    ours = outputs_and_grads(linear_recurrence_triton, q, k, v, kw, cu)
    ref = outputs_and_grads(linear_recurrence_reference, q, k, v, kw, cu)
    assert_all_close(ours, ref, 1e-5)


@pytest.mark.skipif(CUDA, reason="interpreter tests")
def test_half_precision_inputs_and_no_initial_state():
    """bfloat16 and float16 inputs (float32 state and accumulation) without an initial state or final state."""
    for dtype in (torch.bfloat16, torch.float16):
        q, k, v, kw = make("delta", "scalar", 2, 33, 1, 16, 16, dtype=dtype, seed=3)
        kw.pop("initial_state")
        o, f = linear_recurrence_triton(q, k, v, **kw)
        ref, _ = linear_recurrence_reference(q.float(), k.float(), v.float(), **kw)
        assert f is None and o.dtype == dtype
        assert rel_err(o, ref) < 2e-2  # 16-bit products and stored intermediates
    # gradients with 16-bit inputs, including the decay gradient formed from dq and dk (tf32 products)
    q, k, v, kw = make("additive", "scalar", 1, 37, 1, 16, 16, dtype=torch.bfloat16, seed=8)
    ours = outputs_and_grads(linear_recurrence_triton, q, k, v, kw)
    ref = outputs_and_grads(linear_recurrence_reference, q.float(), k.float(), v.float(), kw)
    assert_all_close(ours, ref, 2e-2, {"dlog_decay": 3e-2})


@pytest.mark.skipif(CUDA, reason="interpreter tests")
def test_each_launch_writes_every_element_it_returns():
    """Poisoned buffers: a chunk table with an empty sequence at the end and a one-token sequence."""
    q, k, v, kw = make("additive", "per_key", 1, 34, 2, 16, 16, n_seq=3, seed=4)
    cu = torch.tensor([0, 1, 34, 34])
    o, f = linear_recurrence_triton(q, k, v, **kw, output_final_state=True, cu_seqlens=cu)
    assert torch.isfinite(o).all() and torch.isfinite(f).all()
    assert torch.equal(f[2], kw["initial_state"][2])  # the empty sequence keeps its state


# ----------------------------------------------------------------------------- token-by-token kernel


@pytest.mark.skipif(CUDA, reason="interpreter tests")
@pytest.mark.parametrize("case", [*CASES, "delta_per_key"])
def test_decoding_step_updates_state_in_place(case):
    rule, decay = CASES.get(case, ("delta", "per_key"))
    cu = torch.tensor([0, 2, 2, 5])
    q, k, v, kw = make(rule, decay, 1, 5, 2, 16, 16, n_seq=3, seed=5)
    state = kw.pop("initial_state")
    ref_o, ref_f = linear_recurrence_reference(
        q, k, v, **kw, initial_state=state, output_final_state=True, cu_seqlens=cu
    )
    s = state.clone()
    o = linear_recurrence_step_triton(q, k, v, s, **kw, cu_seqlens=cu)
    assert rel_err(o, ref_o) < 1e-5 and rel_err(s, ref_f) < 1e-5


@pytest.mark.skipif(CUDA, reason="interpreter tests")
def test_short_inputs_without_gradients_run_token_by_token(monkeypatch):
    calls = []
    monkeypatch.setattr(
        ops, "recurrent_forward", lambda *a, **kw: calls.append(1) or launch.recurrent_forward(*a, **kw)
    )
    q, k, v, kw = make("additive", "scalar", 2, 3, 2, 16, 16, seed=6)
    with torch.no_grad():
        o, f = linear_recurrence_triton(q, k, v, **kw, output_final_state=True)
    ref_o, ref_f = linear_recurrence_reference(q, k, v, **kw, output_final_state=True)
    assert calls and rel_err(o, ref_o) < 1e-5 and rel_err(f, ref_f) < 1e-5
    assert not torch.equal(f, kw["initial_state"])  # a new tensor: the caller's state is left alone


@pytest.mark.skipif(CUDA, reason="interpreter tests")
def test_step_rejects_a_state_it_cannot_update_in_place():
    q, k, v, kw = make("additive", None, 1, 1, 1, 16, 16)
    with pytest.raises(ValueError, match="state"):
        linear_recurrence_step_triton(q, k, v, kw["initial_state"].double(), rule="additive")


# ----------------------------------------------------------------------------- support, import guard, compile


def test_supports():
    q, k, v, kw = make("delta", "per_key", 1, 4, 1, 16, 16)
    assert triton_supports(q, k, v) == (CUDA or os.environ.get("TRITON_INTERPRET") == "1")
    assert not triton_supports(q.double(), k.double(), v.double())
    grad_decay = kw["log_decay"].clone().requires_grad_()
    assert not triton_supports(q, k, v, log_decay=grad_decay, beta=kw["beta"], rule="delta")
    with torch.no_grad():
        assert triton_supports(q, k, v, log_decay=grad_decay, beta=kw["beta"], rule="delta") == triton_supports(q, k, v)
    # Head sizes that are not powers of two from 16 go to the PyTorch form.
    for K, V in ((21, 16), (16, 24), (8, 8)):
        q2, k2, v2, _ = make("additive", "none", 1, 4, 1, K, V)
        assert not triton_supports(q2, k2, v2)


def test_imports_cleanly_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from effarch.ops.linear.triton import HAS_TRITON, triton_supports\n"
        "x = torch.zeros(1, 2, 1, 4)\n"
        "assert not HAS_TRITON and not triton_supports(x, x, x)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@pytest.mark.skipif(CUDA, reason="interpreter tests")
def test_custom_ops_trace_under_torch_compile():
    """fullgraph compile (aot_eager: tracing through the custom ops and their fake implementations)."""
    q, k, v, kw = make("delta", "scalar", 2, 20, 1, 16, 16, seed=7)

    def f(q, k, v, g, b, h0):
        o, s = linear_recurrence_triton(
            q, k, v, log_decay=g, beta=b, rule="delta", initial_state=h0, output_final_state=True
        )
        return o.sum() + s.sum()

    args = [x.clone().requires_grad_() for x in (q, k, v, kw["log_decay"], kw["beta"], kw["initial_state"])]
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    grads = torch.autograd.grad(compiled(*args), args)
    ref = torch.autograd.grad(f(*args), args)
    for a, b in zip(grads, ref):
        assert rel_err(a, b) < 1e-6


def test_fake_implementation_matches_schema():
    q, k, v, kw = make("additive", "scalar", 1, 8, 1, 16, 16)
    cu = torch.tensor([0, 8], dtype=torch.int32, device=DEV)
    g = kw["log_decay"].reshape(8, 1).float()
    args = (q[0], k[0], v[0], g, None, kw["initial_state"], cu, 0.25, False, 8, 32 if not CUDA else 64, True)
    torch.library.opcheck(ops.chunk_fwd_op, args, test_utils=("test_schema", "test_faketensor"))
    out = ops.chunk_fwd_op(*args, True)  # the states entering each chunk and the decay's cumsum, kept for the backward
    kept, G = out[3], out[6]
    assert kept.shape == (1, 1, 16, 16) and G.shape == g.shape and G.dtype == torch.float32
    torch.testing.assert_close(G, g.cumsum(0))  # one chunk: the cumsum over the sequence
    torch.library.opcheck(ops.chunk_fwd_op, (*args, True), test_utils=("test_schema", "test_faketensor"))
    beta = torch.rand(8, 1, device=DEV)
    delta_args = (*args[:4], beta, *args[5:8], True, *args[9:], True)  # the delta rule keeps W and U too
    _, _, _, h, w, u, G = ops.chunk_fwd_op(*delta_args)
    assert h.shape == (1, 1, 16, 16) and w.shape == (8, 1, 16) and u.shape == (8, 1, 16) and G.shape == g.shape
    torch.library.opcheck(ops.chunk_fwd_op, delta_args, test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------- CUDA


def _check_bf16_against_float32(case: str, B: int, T: int, H: int, K: int, V: int) -> None:
    """bf16 kernels against the float32 chunked form on the same (bf16-rounded) inputs: 1e-2 relative, 3e-2
    for decay gradients. The additive rule's decay gradient is a suffix sum of q dq - k dk, whose terms cancel:
    bf16 rounding in dq and dk is amplified (peers hold it to 2e-2; seen here: up to 1.8e-2 with bf16 products).
    One fixed decay per head has one gradient per head, the sum of every token's: 5e-2 (on an H200 with bf16
    products, 3.3e-2 at K = 32, V = 64 over 3 x 200 tokens; under 3e-2 with tf32 products)."""
    rule, decay = CASES[case]
    q, k, v, kw = make(rule, decay, B, T, H, K, V, dtype=torch.bfloat16)
    if rule == "delta":
        q = F.normalize(q.float(), dim=-1).bfloat16()
    kw["initial_state"] = kw["initial_state"] * 0.1
    ours = outputs_and_grads(linear_recurrence_triton, q, k, v, kw)
    ref_kw = {n: x.float() if isinstance(x, torch.Tensor) else x for n, x in kw.items()}
    ref = outputs_and_grads(linear_recurrence_chunked, q.float(), k.float(), v.float(), ref_kw)
    if decay == "fixed" and not backward.decay_grad_forms(1)[0]:
        _check_fixed_decay_gradient(ours, ref)
    assert_all_close(ours, ref, 1e-2, {"dlog_decay": 5e-2 if decay == "fixed" else 3e-2})


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_bf16_matches_float32_at_real_shapes(case):
    _check_bf16_against_float32(case, 2, 1000, 4, 128, 128)


# Launch settings that benchmarks/linear_ops.py --try measures against the shipped ones: each must be right on the
# GPU before its timing counts (Hopper's wgmma build was wrong at some shapes, see launch.WGMMA).
SETTINGS = [
    *({"STATE_PASS": p, "case": c} for p in ("fused", "two_phase") for c in CASES),
    *({"DELTA_PREP_WARPS": 8, "case": c} for c in ("delta", "gated_delta")),
    *({"DELTA_PREP_IN_REGS": False, "case": c} for c in ("delta", "gated_delta")),
    *(
        {"DELTA_INVERSE": "substitution", "DELTA_PREP_IN_REGS": r, "case": c}
        for r in (True, False)
        for c in ("delta", "gated_delta")
    ),
    *({"STATE_BWD_DOTS": "tf32", "case": c} for c in ("delta", "gated_delta")),
    *({"DELTA_GRAD_BUFFERS": "float32", "case": c} for c in ("delta", "gated_delta")),
    *({"DELTA_STATE_BWD_BV": 16, "STATE_BWD_DOTS": "tf32", "case": c} for c in ("delta", "gated_delta")),
    *({"DECAY_SUFFIX_KERNEL": False, "case": c} for c in ("fixed", "scalar", "per_key")),
    *({"DECAY_SUFFIX_BD": b, "DECAY_SUFFIX_WARPS": w, "case": "per_key"} for b, w in ((16, 2), (8, 1), (8, 2))),
    *({"DECAY_GRAD_LATER": "suffix", "DECAY_GRAD_DOTS": "tf32", "case": c} for c in ("fixed", "scalar")),
    *({"DECAY_GRAD_LATER": "state", "DECAY_GRAD_DOTS": d, "case": "per_key"} for d in ("tf32", "input")),
    *({"DECAY_GRAD_DOTS": "tf32", "case": c} for c in ("fixed", "scalar")),
    *({"STATE_GRAD_BUFFER": "float32", "case": c} for c in CASES),
    *({"DV_LOCAL_WARPS": 8, "case": c} for c in CASES),
    *({"DV_LOCAL_BV": 128, "DV_LOCAL_WARPS": w, "case": c} for w in (4, 8) for c in CASES),
    *({"DV_DOTS": "decay", "case": c} for c in ("fixed", "scalar", "per_key")),
    *({"GLA_FWD_STATE_PASS": p, "case": "per_key"} for p in ("fused", "two_phase")),  # "auto": one of the two
    *({"OUT_FWD_WARPS": 8, "case": c} for c in CASES),
    *({"GLA_INTRA_BWD_BK": b, "GLA_INTRA_BWD_WARPS": w, "case": "per_key"} for b, w in ((64, 8), (32, 4), (32, 8))),
    *({"DELTA_DQK_DOTS": "tf32", "case": c} for c in ("delta", "gated_delta")),
    *(
        {"DELTA_STATE_BWD_SPLIT": True, "DELTA_SPLIT_BV": bv, "DELTA_SPLIT_WARPS": w, "STATE_PASS": p, "case": c}
        for bv, w, p in ((32, 8, "fused"), (32, 4, "fused"), (64, 8, "fused"), (32, 8, "two_phase"))
        for c in ("delta", "gated_delta")
    ),
    *({"STATE_BWD_WARPS": 4, "case": c} for c in CASES),
    *({"DQK_WARPS": 4, "case": c} for c in CASES),
    *({"WY_BWD_WARPS": 4, "case": c} for c in ("delta", "gated_delta")),
    *({"STATE_FWD_WARPS": 8, "case": c} for c in CASES),
    *({"DQK_SPLIT_HALF": True, "DQK_BV": bv, "case": c} for bv in (32, 64) for c in CASES),
    *({"DQK_BV": 64, "case": c} for c in CASES),
    {"GLA_INTRA_BK": 0, "case": "per_key"},
    *({"SAVE_STATES": False, "case": c} for c in CASES),
]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("setting", SETTINGS, ids=lambda d: "-".join(f"{v}" for v in d.values()))
def test_cuda_launch_settings_bf16(setting, monkeypatch):
    for name, value in setting.items():
        if name != "case":
            monkeypatch.setattr(launch if hasattr(launch, name) else backward, name, value)
    _check_bf16_against_float32(setting["case"], 2, 1000, 4, 128, 128)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize(("K", "V"), [(16, 16), (16, 32), (32, 32), (32, 64), (64, 32), (64, 64), (64, 128), (128, 64)])
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_bf16_small_head_dims(case, K, V):
    """Small models (the arena's debug and small sizes) run heads of 16 to 64: bf16 at those widths, where
    Hopper's wgmma build was wrong (see launch.WGMMA)."""
    _check_bf16_against_float32(case, 3, 200, 2, K, V)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", ["scalar", "gated_delta"])
def test_cuda_key_groups_bf16(case):
    """Mamba2's layout on the GPU: one key group serving four value heads, K = 128, V = 64, bf16."""
    rule, decay = CASES[case]
    q, k, v, kw = make(rule, decay, 2, 300, 4, 128, 64, dtype=torch.bfloat16)
    q, k = q[:, :, :1].contiguous(), k[:, :, :1].contiguous()
    if rule == "delta":
        q, k = (F.normalize(x.float(), dim=-1).bfloat16() for x in (q, k))
    kw["initial_state"] = kw["initial_state"] * 0.1
    ours = outputs_and_grads(linear_recurrence_triton, q, k, v, kw)
    ref_kw = {n: x.float() if isinstance(x, torch.Tensor) else x for n, x in kw.items()}
    ref = outputs_and_grads(linear_recurrence_chunked, q.float(), k.float(), v.float(), ref_kw)
    assert ours["dq"].shape == q.shape
    assert_all_close(ours, ref, 1e-2, {"dlog_decay": 3e-2})


def _check_fixed_decay_gradient(ours: dict, ref: dict) -> None:
    """One decay per head with backward.DECAY_GRAD_LATER = "suffix": its gradient sums the per-token terms (held
    to 3e-2 in the "scalar" case) over every token, where the sequence-long suffix sums of q dq - k dk cancel, so
    bf16 rounding of q and k leaves a large relative error (on an H200 with Triton 3.6: 6e-2 to 5e-1 at head
    widths 16 to 128, 7.8e-2 at K = V = 128 and 2 x 1000 tokens). It must still be finite and point the same
    way. Removes it from both dicts. (With "state" it is held to 5e-2, see _check_bf16_against_float32.)"""
    dg, dg_ref = ours.pop("dlog_decay"), ref.pop("dlog_decay")
    assert torch.isfinite(dg).all(), "dlog_decay has non-finite values"
    assert torch.nn.functional.cosine_similarity(dg.flatten(), dg_ref.flatten(), dim=0) > 0.8


def test_wgmma_is_used_only_at_widths_where_it_was_right(monkeypatch):
    """Hopper wgmma is wrong at some widths (see launch.WGMMA): the switch Triton reads while compiling turns it
    off inside the kernels' build context for those widths only, and is restored after it."""
    assert launch.wgmma_ok(128, 128) and launch.wgmma_ok(128, 64) and launch.wgmma_ok(32, 64)
    assert not launch.wgmma_ok(64, 32) and not launch.wgmma_ok(16, 16) and not launch.wgmma_ok(16, 32)
    monkeypatch.delenv("DISABLE_MMA_V3", raising=False)
    with launch.kernel_build_options(64, 32):
        assert os.environ["DISABLE_MMA_V3"] == "1"
    assert "DISABLE_MMA_V3" not in os.environ
    with launch.kernel_build_options(128, 128):
        assert "DISABLE_MMA_V3" not in os.environ
    monkeypatch.setenv("DISABLE_MMA_V3", "0")
    with launch.kernel_build_options(16, 16):
        assert os.environ["DISABLE_MMA_V3"] == "1"
    assert os.environ["DISABLE_MMA_V3"] == "0"
    monkeypatch.setattr(launch, "WGMMA", True)
    with launch.kernel_build_options(16, 16):
        assert os.environ["DISABLE_MMA_V3"] == "0"
    monkeypatch.setattr(launch, "WGMMA", False)
    with launch.kernel_build_options(128, 128):
        assert os.environ["DISABLE_MMA_V3"] == "1"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_float32_packed_matches_reference():
    cu = torch.tensor([0, 70, 70, 300], device=DEV)
    q, k, v, kw = make("delta", "scalar", 1, 300, 2, 64, 64, n_seq=3)
    ours = outputs_and_grads(linear_recurrence_triton, q, k, v, kw, cu)
    ref = outputs_and_grads(linear_recurrence_reference, q, k, v, kw, cu)
    assert_all_close(ours, ref, 1e-4)  # float32 products formed exactly ("ieee"); reductions reorder


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_autocast_runs_float32_features_in_the_autocast_dtype():
    """Under autocast, a float32 q (an L2-normalised feature map) must not pull the kernel onto exact float32
    products: the result equals the call with every input already in bf16."""
    from effarch.ops.linear import linear_recurrence

    q, k, v, kw = make("delta", "scalar", 2, 300, 2, 64, 64)
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        o, s = linear_recurrence(q, k, v.bfloat16(), **kw, output_final_state=True)
    o16, s16 = linear_recurrence(
        q.bfloat16(), k.bfloat16(), v.bfloat16(), **kw, output_final_state=True, backend="triton"
    )
    assert o.dtype == torch.bfloat16
    torch.testing.assert_close(o, o16, rtol=0, atol=0)
    torch.testing.assert_close(s, s16, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("shape", "dim", "block"), [((2, 300, 3, 5), 1, 8), ((1000, 4), 0, 4), ((3, 7), 1, 64), ((130,), 0, 64)]
)
def test_reverse_cumsum_in_blocks_equals_the_plain_scan(shape, dim, block):
    """Lengths over one, two and three levels of blocks, partial last blocks, inner and outer dims."""
    from effarch.ops.linear.triton.backward import reverse_cumsum

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)), dtype=torch.float64).to(DEV)
    ours = reverse_cumsum(x, dim, block)
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, x.flip(dim).cumsum(dim).flip(dim), rtol=1e-12, atol=1e-12)
