"""Delta-rule, RWKV-7, test-time-training and SSM mixers: checks specific to each paper's equations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from effarch import registry
from effarch.ops.linear.generalized_delta import (
    generalized_delta_rule,
    generalized_delta_rule_chunked,
    generalized_delta_rule_reference,
)

# ---- the generalised delta rule (RWKV-7) ---------------------------------------------------------------


def gd_inputs(B=2, T=11, H=2, K=4, V=3, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)

    kappa = F.normalize(r(B, T, H, K), dim=-1)
    icl = torch.rand(B, T, H, K, generator=g, dtype=torch.float64).to(dtype)
    log_w = -torch.rand(B, T, H, K, generator=g, dtype=torch.float64).to(dtype) * 2
    return dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, V), a=-kappa, b=kappa * icl, log_decay=log_w)


def test_generalized_delta_reference_equals_the_papers_column_form():
    # Paper (arXiv 2503.14456): S^c_t = S^c_{t-1} (diag(w_t) + a_t^T b_t) + v_t^T k_t, o_t^T = S^c_t q_t^T,
    # evaluated with explicit K x K transition matrices.
    x = gd_inputs()
    B, T, H, K = x["q"].shape
    V = x["v"].shape[-1]
    S0 = torch.randn(B, H, K, V, dtype=torch.float64)
    o, final = generalized_delta_rule_reference(**x, scale=0.7, initial_state=S0, output_final_state=True)
    for b in range(B):
        for h in range(H):
            Sc = S0[b, h].T.clone()  # [V, K]
            for t in range(T):
                at, bt = x["a"][b, t, h][None], x["b"][b, t, h][None]  # row vectors [1, K]
                trans = torch.diag(x["log_decay"][b, t, h].exp()) + at.T @ bt
                Sc = Sc @ trans + x["v"][b, t, h][None].T @ x["k"][b, t, h][None]
                assert torch.allclose(o[b, t, h], 0.7 * (Sc @ x["q"][b, t, h]), atol=1e-12)
            assert torch.allclose(final[b, h], Sc.T, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("T, chunk", [(1, 4), (5, 4), (16, 4), (19, 8), (33, 16)])
def test_generalized_delta_chunked_matches_reference(dtype, T, chunk):
    x = gd_inputs(T=T, dtype=dtype)
    S0 = torch.randn(2, 2, 4, 3, dtype=dtype)
    o_ref, f_ref = generalized_delta_rule_reference(**x, initial_state=S0, output_final_state=True)
    o, f = generalized_delta_rule_chunked(**x, initial_state=S0, output_final_state=True, chunk_size=chunk)
    assert f.dtype == dtype
    assert_close(o, o_ref)
    assert_close(f, f_ref)


def test_generalized_delta_packed_sequences_equal_separate():
    lens = [3, 0, 9, 1]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    x = gd_inputs(B=1, T=sum(lens))
    S0 = torch.randn(len(lens), 2, 4, 3, dtype=torch.float64)
    for backend in ("reference", "torch"):
        o, f = generalized_delta_rule(**x, initial_state=S0, output_final_state=True, cu_seqlens=cu, backend=backend)
        for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            part = {n: t[:, s:e] for n, t in x.items()}
            o_i, f_i = generalized_delta_rule_reference(**part, initial_state=S0[i : i + 1], output_final_state=True)
            if e > s:
                assert_close(o[:, s:e], o_i)
            assert_close(f[i : i + 1], f_i)


def test_generalized_delta_chunked_gradients_match_reference():
    x = gd_inputs(T=10)
    S0 = torch.randn(2, 2, 4, 3, dtype=torch.float64)
    leaves = {**x, "initial_state": S0}

    def grads(fn, **kw):
        ins = {n: t.clone().requires_grad_() for n, t in leaves.items()}
        o, f = fn(**ins, output_final_state=True, **kw)
        g = torch.Generator().manual_seed(5)  # fixed cotangents (randn_like would follow the output's strides)
        wo = torch.randn(o.shape, generator=g, dtype=o.dtype)
        wf = torch.randn(f.shape, generator=g, dtype=f.dtype)
        ((o * wo).sum() + (f * wf).sum()).backward()
        return {n: t.grad for n, t in ins.items()}

    g, g_ref = grads(generalized_delta_rule_chunked, chunk_size=4), grads(generalized_delta_rule_reference)
    for n in leaves:
        assert_close(g[n], g_ref[n], tol=1e-9)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(a=torch.randn(2, 11, 2, 3)), "a has shape"),
        (dict(log_decay=None), "log_decay"),
        (dict(v=torch.randn(2, 10, 2, 3)), "does not match"),
        (dict(initial_state=torch.randn(1, 2, 4, 3)), "initial_state"),
        (dict(backend="fast"), "backend"),
    ],
)
def test_generalized_delta_bad_input(change, match):
    x = {**gd_inputs(), **{n: (t.double() if isinstance(t, torch.Tensor) else t) for n, t in change.items()}}
    with pytest.raises(ValueError, match=match):
        generalized_delta_rule(**x)


# ---- TTT-Linear ---------------------------------------------------------------------------------------


def tiny(name, **opts):
    entry = registry.get("mixer", name)
    torch.manual_seed(2)
    m = entry.obj(32, **{**entry.debug, **opts}).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def test_ttt_output_equals_hand_written_minibatch_gradient_steps():
    b = 3
    m = tiny("ttt_linear", mini_batch_size=b)
    H, K = m.n_heads, m.head_dim
    x = torch.randn(1, 2 * b + 2, 32, dtype=torch.float64)
    with torch.no_grad():
        y, _ = m(x)
    q, k, v = m.qkv_proj(x).view(1, -1, 3, H, K).unbind(2)
    eta = m.ttt_base_lr / K * torch.sigmoid(m.lr_proj(x))
    gamma, beta = m.ttt_norm_weight, m.ttt_norm_bias

    def ln(z, h):
        return F.layer_norm(z, (K,), eps=1e-6) * gamma[h] + beta[h]

    zs = []
    for h in range(H):
        W, c = m.W_init[h].detach().clone(), m.b_init[h].detach().clone()
        for start in range(0, x.shape[1], b):
            W0, c0 = W.clone().requires_grad_(), c.clone().requires_grad_()
            for t in range(start, min(start + b, x.shape[1])):
                loss = 0.5 * (ln(k[0, t, h] @ W0 + c0, h) - (v[0, t, h] - k[0, t, h])).pow(2).sum()
                gW, gc = torch.autograd.grad(loss, (W0, c0))
                W, c = W - eta[0, t, h] * gW, c - eta[0, t, h] * gc  # W_t = W_0 - sum_s eta_s grad(W_0; x_s)
                zs.append((t, h, q[0, t, h] + ln(q[0, t, h] @ W + c, h)))
    z = torch.zeros(1, x.shape[1], H, K, dtype=torch.float64)
    for t, h, val in zs:
        z[0, t, h] = val.detach()
    with torch.no_grad():
        expect = m.o_proj(m.post_norm(z.reshape(1, -1, H * K)) * F.gelu(m.g_proj(x)))
    assert_close(y, expect, tol=1e-10)


def test_ttt_state_after_full_minibatches_has_no_pending_update():
    m = tiny("ttt_linear", mini_batch_size=4)
    with torch.no_grad():
        _, st = m(torch.randn(2, 8, 32, dtype=torch.float64))
    assert int(st["pos"][0]) == 0 and torch.equal(st["W0"], st["W"])
    with torch.no_grad():
        _, st = m(torch.randn(2, 6, 32, dtype=torch.float64))
    assert int(st["pos"][0]) == 2 and not torch.equal(st["W0"], st["W"])


# ---- Titans -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3])
def test_titans_memory_follows_momentum_and_forgetting_equations(chunk):
    m = tiny("titans", chunk_size=chunk)
    B, T, H, K = 1, 8, 2, 4
    g = torch.Generator().manual_seed(0)
    q, k, v = (F.normalize(torch.randn(B, T, H, K, generator=g, dtype=torch.float64), dim=-1) for _ in range(3))
    alpha, eta, theta = (torch.rand(B, T, H, generator=g, dtype=torch.float64) for _ in range(3))
    y, st = m._core([q, k, v, torch.log1p(-alpha), eta.log(), theta], None)
    M = torch.zeros(H, K, K, dtype=torch.float64)
    S = torch.zeros_like(M)
    for t in range(T):
        if t % chunk == 0:
            base = M.clone()  # gradients are taken at the memory the mini-batch started from
        Mb = base.clone().requires_grad_()
        loss = 0.5 * (torch.einsum("hk,hkv->hv", k[0, t], Mb) - v[0, t]).pow(2).sum()
        (grad,) = torch.autograd.grad(loss, Mb)
        S = eta[0, t, :, None, None] * S - theta[0, t, :, None, None] * grad
        M = (1 - alpha[0, t, :, None, None]) * M + S
        assert torch.allclose(y[0, t], torch.einsum("hk,hkv->hv", q[0, t], M), atol=1e-12)
    assert torch.allclose(st["M"][0], M, atol=1e-12) and torch.allclose(st["S"][0], S, atol=1e-12)


# ---- Longhorn, Gated DeltaNet, RWKV-7, Mamba ------------------------------------------------------------


def test_longhorn_step_is_the_closed_form_online_regression_minimiser():
    # Longhorn (arXiv 2407.14207): S_t = argmin_S ||S - S_{t-1}||^2 + beta ||k S - x||^2, per head.
    m = tiny("longhorn").eval()
    with torch.no_grad():
        _, st = m(torch.randn(1, 5, 32, dtype=torch.float64))
        x = torch.randn(1, 1, 32, dtype=torch.float64)
        _, st1 = m(x, st)
        xi, _ = m.in_proj(x).chunk(2, dim=-1)
        xc, _ = m.convs["x"](xi, st["conv_x"])
        r, k, _ = m.x_proj(xc).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
        beta = torch.sigmoid(m.beta_proj(r))[0, 0]  # [H]
        targets = xc[0, 0].view(m.n_heads, m.value_dim)
        kk = k[0, 0][:, None] @ k[0, 0][None, :]  # k^T k, [N, N]
        eye = torch.eye(m.d_state, dtype=torch.float64)
        for h in range(m.n_heads):
            lhs = eye + beta[h] * kk  # normal equations of the objective
            rhs = st["S"][0, h] + beta[h] * k[0, 0][:, None] @ targets[h][None, :]
            assert torch.allclose(st1["S"][0, h], torch.linalg.solve(lhs, rhs), atol=1e-12)


def test_gated_deltanet_with_an_open_gate_is_deltanet():
    gdn = tiny("gated_deltanet")
    dn = registry.get("mixer", "deltanet").obj(32, n_heads=4, expand_v=2.0, use_gate=True).double()
    missing = dn.load_state_dict(gdn.state_dict(), strict=False)
    assert not missing.missing_keys and set(missing.unexpected_keys) == {"a_proj.weight", "A_log", "dt_bias"}
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    with torch.no_grad():
        y_gdn, _ = gdn(x)
        assert (y_gdn - dn(x)[0]).abs().max() > 1e-6  # the decay matters ...
        gdn.A_log.fill_(-1e4)  # ... and with a = exp(-exp(A_log) softplus(.)) = 1 it is gone
        assert_close(gdn(x)[0], dn(x)[0], tol=1e-12)


def test_rwkv7_decay_stays_in_the_papers_range():
    m = tiny("rwkv7")
    x = 50 * torch.randn(2, 7, 32, dtype=torch.float64)
    from effarch.layers.linear_mixer import Context

    f = m.features(x, Context(m, None, None))
    assert f.log_decay.min() >= -torch.exp(torch.tensor(-0.5, dtype=torch.float64)) - 1e-12
    assert f.log_decay.max() <= 0


def test_mamba_initialisation_survives_the_model_init():
    from effarch.models.lm import build_model
    from effarch.models.presets import preset_config

    m = build_model(preset_config("mamba:debug")).blocks[0].mixer
    N = m.d_state
    A = -torch.exp(m.A_log.detach())
    assert torch.allclose(A, -torch.arange(1, N + 1, dtype=torch.float32).expand(m.d_inner, N), rtol=1e-6)
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= m.dt_min * (1 - 1e-5) and dt.max() <= m.dt_max * (1 + 1e-5)
    assert torch.equal(m.D, torch.ones_like(m.D))


# ---- presets ------------------------------------------------------------------------------------------

MY_PRESETS = ["mamba", "deltanet", "gated-deltanet", "rwkv7", "ttt-linear", "titans", "longhorn"]


@pytest.mark.parametrize("name", MY_PRESETS)
def test_preset_builds_at_every_size_and_trains(name):
    from effarch.models.lm import build_model
    from effarch.models.presets import SIZES, preset_config

    for size in SIZES:
        cfg = preset_config(f"{name}:{size}")
        assert cfg.d_model == SIZES[size]["d_model"]
    torch.manual_seed(0)
    model = build_model(preset_config(f"{name}:debug"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 260, (2, 24))
    losses = []
    for _ in range(4):
        loss = model(ids[:, :-1], targets=ids[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
