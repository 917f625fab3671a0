"""TTT-Linear's inference kernel (`effarch.ops.ttt`) against the mixer's PyTorch mini-batch loop.

Under the Triton interpreter on a machine without CUDA: random weights and inputs, fresh and mid-mini-batch
states (rows at different positions), one-token steps, the kernel's outputs and every state tensor within
float32 rounding of the loop. Dispatch: the kernel only without gradients, the loop when training.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from conftest import rel_err
from triton_mode import CUDA, fresh_process_only, restore_environment, run_file_in_fresh_process  # noqa: F401

pytest.importorskip("triton")

from effarch.layers.mixers.ttt import TTTLinear  # noqa: E402
from effarch.ops.ttt.kernels import triton_supports, ttt_minibatch_triton  # noqa: E402

dispatch = importlib.import_module("effarch.ops.ttt")
DEV = "cuda" if CUDA else "cpu"


def test_in_fresh_process():
    run_file_in_fresh_process(__file__)


def layer(K=16, H=2, size=16, seed=0):
    torch.manual_seed(seed)
    m = TTTLinear(H * K, n_heads=H, mini_batch_size=size).to(DEV)
    with torch.no_grad():  # away from the identity initialisation, so every term matters
        m.W_init.normal_(0, 0.3)
        m.b_init.normal_(0, 0.3)
        m.ttt_norm_weight.uniform_(0.5, 1.5)
        m.ttt_norm_bias.normal_(0, 0.3)
    return m


def inputs(B, T, H, K, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, K, generator=g).to(DEV) for _ in range(3))
    eta = (0.05 * torch.rand(B, T, H, generator=g)).to(DEV)
    return q, k, v, eta


def both(m, q, k, v, eta, state):
    """(kernel z, kernel state), (loop z, loop state) for the same inputs."""
    gamma, beta = m.ttt_norm_weight.detach(), m.ttt_norm_bias.detach()
    st = dict(m.initial_state(q.shape[0], q.dtype) if state is None else state)
    st = {n: t.detach() for n, t in st.items()}
    with torch.no_grad():
        assert triton_supports(q, gamma, st, m.mini_batch_size)
        ours = ttt_minibatch_triton(q, k, v - k, eta, gamma, beta, st, m.mini_batch_size)
        # the loop takes one position for all rows (the layer splits rows that differ): row by row
        rows = [
            m._loop(*(t[i : i + 1] for t in (q, k, v - k, eta)), gamma, beta,
                    {n: t[i : i + 1] for n, t in st.items()}, state is None)
            for i in range(q.shape[0])
        ]  # fmt: skip
        ref = torch.cat([r[0] for r in rows]), {n: torch.cat([r[1][n] for r in rows]) for n in rows[0][1]}
    return ours, ref


def assert_close(ours, ref, tol=1e-5):
    assert rel_err(ours[0], ref[0]) < tol, f"z: {rel_err(ours[0], ref[0]):.2e}"
    for n in ("W0", "c0", "W", "c"):
        assert rel_err(ours[1][n], ref[1][n]) < tol, f"{n}: {rel_err(ours[1][n], ref[1][n]):.2e}"


@pytest.mark.parametrize(("K", "size", "T"), [(16, 16, 40), (32, 16, 16), (16, 32, 70)])
def test_kernel_matches_the_loop_from_a_fresh_state(K, size, T):
    m = layer(K=K, size=size)
    assert_close(*both(m, *inputs(2, T, 2, K, seed=K + T), None))


def test_kernel_continues_rows_at_different_mini_batch_positions():
    """A state whose rows stand at positions 3 and 11 of their mini-batches, then 30 tokens and single steps."""
    m = layer()
    B, H, K = 2, 2, 16
    q, k, v, eta = inputs(B, 14, H, K, seed=5)
    st = dict(m.initial_state(B, torch.float32))
    with torch.no_grad():  # bring the rows to positions 3 and 11 with the loop, one row at a time
        rows = []
        for i, n in enumerate((3, 11)):
            one = {name: t[i : i + 1] for name, t in st.items()}
            _, s1 = m._core([t[i : i + 1, :n] for t in (q, k, v, eta)], one)
            rows.append(s1)
        st = {n: torch.cat([r[n] for r in rows]).contiguous() for n in rows[0]}
    assert st["pos"].tolist() == [3, 11]
    for T, seed in ((30, 6), (1, 7), (1, 8)):
        ours, ref = both(m, *inputs(B, T, H, K, seed=seed), st)
        assert_close(ours, ref)
        st = {**ref[1], "pos": (st["pos"] + T) % m.mini_batch_size}


def test_layer_uses_the_kernel_only_without_gradients(monkeypatch):
    """Through the layer: inference (no_grad) goes to the kernel and equals the loop; training keeps the loop."""
    m = layer()
    calls = []
    monkeypatch.setattr(dispatch, "_on_gpu", lambda x: True)
    monkeypatch.setattr(dispatch, "AUTO_TRITON", True)
    real = dispatch._load()
    monkeypatch.setattr(dispatch, "_load", lambda: (lambda *a: calls.append(1) or real[0](*a), real[1]))
    x = torch.randn(2, 37, m.d_model, generator=torch.Generator().manual_seed(9)).to(DEV)
    with torch.no_grad():
        y_kernel, st_kernel = m(x)
    assert calls == [1]
    y_loop, st_loop = m(x)  # gradients on: the loop
    assert calls == [1] and y_loop.requires_grad
    assert rel_err(y_kernel, y_loop.detach()) < 1e-5
    for n in ("W0", "c0", "W", "c"):
        assert rel_err(st_kernel[n], st_loop[n].detach()) < 1e-5


def test_layers_keep_the_loop_unless_enabled(monkeypatch):
    monkeypatch.setattr(dispatch, "AUTO_TRITON", False)
    monkeypatch.setattr(dispatch, "_on_gpu", lambda x: True)
    monkeypatch.setattr(dispatch, "_load", lambda: pytest.fail("the kernel must not be loaded"))
    m = layer()
    with torch.no_grad():
        m(torch.randn(1, 20, m.d_model).to(DEV))


def test_supports():
    m = layer()
    q = torch.randn(1, 4, 2, 16).to(DEV)
    st = m.initial_state(1, torch.float32)
    gamma = m.ttt_norm_weight
    assert not triton_supports(q, gamma, st, 16)  # gradients wanted (parameters in the state)
    with torch.no_grad():
        assert triton_supports(q, gamma, m.initial_state(1, torch.float32), 16)
        assert not triton_supports(q.double(), gamma, st, 16)  # float64 stays on the loop
        assert not triton_supports(torch.randn(1, 4, 2, 24).to(DEV), gamma, st, 16)  # K not a power of two
        assert not triton_supports(q, gamma, st, 8)  # mini-batch under 16 tokens
