"""Additive linear-recurrence mixers (linear attention, Based, RetNet, Lightning, GLA, HGRN2, RWKV-6, Mamba-2,
mLSTM): each paper's equations written out directly, the shared skeleton's contracts, and their presets."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from effarch import registry
from effarch.layers.feature_maps import FEATURE_MAPS, feature_dim, get_feature_map
from effarch.layers.linear_mixer import Features, token_shift
from effarch.layers.mixers.lightning import lightning_log_decay
from effarch.layers.mixers.mlstm import mlstm_stabilizer
from effarch.layers.mixers.retnet import retention_log_decay
from effarch.models.lm import build_model
from effarch.models.presets import preset_config

D = 64
MIXERS = ["linear_attn", "based", "retnet", "lightning", "gla", "hgrn2", "rwkv6", "mamba2", "mlstm"]
PRESETS = ["linear-attn", "based", "retnet", "lightning", "gla", "hgrn2", "rwkv6", "mamba2", "mlstm"]


def make(name: str, dtype=torch.float64, causal: bool = True, **options):
    entry = registry.get("mixer", name)
    torch.manual_seed(1)
    m = entry.obj(D, causal=causal, **{**entry.debug, **options}).to(dtype)
    with torch.no_grad():  # random values everywhere, so every gate and decay matters
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


# ---- feature maps ------------------------------------------------------------------------------------


def test_taylor_feature_map_gives_second_order_expansion_of_exp():
    q, k = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    phi = get_feature_map("taylor")
    s = (q * k).sum(-1)
    assert phi(q).shape[-1] == feature_dim("taylor", 7) == 1 + 7 + 49
    assert torch.allclose((phi(q) * phi(k)).sum(-1), 1 + s + s**2 / 2, atol=1e-12)


def test_elu_feature_map_is_positive_and_unknown_maps_are_refused():
    assert (get_feature_map("elu")(torch.linspace(-10, 10, 101, dtype=torch.float64)) > 0).all()
    assert set(FEATURE_MAPS) == {"identity", "elu", "relu", "taylor"}
    with pytest.raises(ValueError, match="feature_map 'softmax'"):
        get_feature_map("softmax")
    with pytest.raises(ValueError, match="feature_map"):
        registry.get("mixer", "linear_attn").obj(D, feature_map="softmax")


# ---- each paper's equations, written out ---------------------------------------------------------------


def test_normalised_linear_attention_equals_the_quadratic_formula():
    # "Transformers are RNNs" eq. 4: o_t = sum_s phi(q_t).phi(k_s) v_s / sum_s phi(q_t).phi(k_s), s <= t.
    m = make("linear_attn")
    x = torch.randn(2, 13, D, dtype=torch.float64)
    y, _ = m(x)
    phi = m.phi
    q, k = phi(m.split_heads(m.q_proj(x))), phi(m.split_heads(m.k_proj(x)))
    v = m.split_heads(m.v_proj(x))
    A = torch.einsum("bthk,bshk->bhts", q, k).tril()
    o = torch.einsum("bhts,bshv->bthv", A, v) / (A.sum(-1).transpose(1, 2)[..., None] + m.eps)
    assert_close(y, m.o_proj(o.flatten(2)))


def test_retnet_decays_are_the_papers():
    gamma = retention_log_decay(4, torch.float64).exp()
    assert torch.allclose(gamma, torch.tensor([1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128, 1 - 1 / 256], dtype=torch.float64))
    m = make("retnet")
    f = m.features(torch.randn(1, 3, D, dtype=torch.float64), _ctx(m))
    assert torch.equal(f.log_decay, retention_log_decay(m.n_heads, torch.float64))
    assert f.v.shape[-1] == 2 * f.k.shape[-1]  # values twice as wide as keys


def test_lightning_decays_follow_alibi_slopes_and_depth():
    lam = lightning_log_decay(8, layer_idx=0, n_layers=4, dtype=torch.float64)
    slopes = torch.tensor([2 ** (-8 * (h + 1) / 8) for h in range(8)], dtype=torch.float64)
    assert torch.allclose(lam, -slopes * (1 + 1e-5))
    top = lightning_log_decay(8, layer_idx=3, n_layers=4, dtype=torch.float64)
    assert (top.abs() < 1e-4).all()  # the top layer barely forgets


def test_gla_gate_is_sigmoid_of_low_rank_projection_to_the_one_sixteenth():
    m = make("gla")
    x = torch.randn(1, 5, D, dtype=torch.float64)
    f = m.features(x, _ctx(m))
    alpha = torch.sigmoid(m.gk_proj(x)) ** (1 / 16)
    assert_close(f.log_decay.exp().flatten(2), alpha)
    assert f.k.shape[-1] * m.n_heads == D // 2  # expand_k = 0.5


def test_hgrn2_key_is_one_minus_forget_gate_above_its_lower_bound():
    m = make("hgrn2", lower_bound=0.3)
    f = m.features(torch.randn(1, 9, D, dtype=torch.float64), _ctx(m))
    forget = f.log_decay.exp()
    assert (forget >= 0.3).all()
    assert_close(f.k, 1 - forget)
    assert registry.get("mixer", "hgrn2").obj(D, expand_ratio=16, layer_idx=2, n_layers=4).lower_bound == 0.5


def test_rwkv6_recurrence_equals_the_wkv_formula_with_bonus():
    # Finch: o_t = r_t (diag(u) k_t^T v_t + sum_{i<t} diag(prod_{j=i+1}^{t-1} w_j) k_i^T v_i); final h_T.
    m = make("rwkv6")
    B, T, H, K = 2, 9, m.n_heads, m.key_dim
    r, k, v = (torch.randn(B, T, H, K, dtype=torch.float64) for _ in range(3))
    log_w = -torch.rand(B, T, H, K, dtype=torch.float64) * 2
    S0 = torch.randn(B, H, K, K, dtype=torch.float64)
    state = {"S": S0}
    o, new = m.recurrence(Features(r, k, v, log_decay=log_w), state, None)
    u = m.u.detach()
    h = S0.clone()
    for t in range(T):
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        expected = torch.einsum("bhk,bhkv->bhv", r[:, t], h + u[None, :, :, None] * kv)
        assert torch.allclose(o[:, t], expected, atol=1e-12)
        h = log_w[:, t, :, :, None].exp() * h + kv
    assert torch.allclose(new["S"], h, atol=1e-12)


def test_mlstm_stabilised_recurrence_equals_the_unstabilised_equations():
    # xLSTM: C_t = f C_{t-1} + i k^T v, n_t = f n_{t-1} + i k, h_t = q C_t / max(|q n_t|, 1), i = exp(i~).
    m = make("mlstm")
    B, T, H, P = 2, 11, m.n_heads, m.key_dim
    q, k = torch.randn(B, T, H, P, dtype=torch.float64), torch.randn(B, T, H, P, dtype=torch.float64)
    v = torch.randn(B, T, H, P, dtype=torch.float64)
    log_i = torch.randn(B, T, H, dtype=torch.float64) * 3
    log_f = F.logsigmoid(torch.randn(B, T, H, dtype=torch.float64) * 3)
    v1 = torch.cat([v, torch.ones(B, T, H, 1, dtype=torch.float64)], -1)

    def piece(a, b):
        return Features(q[:, a:b], k[:, a:b], v1[:, a:b], extras={"log_i": log_i[:, a:b], "log_f": log_f[:, a:b]})

    h1, st = m.recurrence(piece(0, T), None, None)
    _, st6 = m.recurrence(piece(0, 6), None, None)
    h2, _ = m.recurrence(piece(6, T), st6, None)
    C = torch.zeros(B, H, P, P, dtype=torch.float64)
    n = torch.zeros(B, H, P, dtype=torch.float64)
    ks = k * P**-0.5
    for t in range(T):
        fg, ig = log_f[:, t].exp()[..., None], log_i[:, t].exp()[..., None]
        C = fg[..., None] * C + ig[..., None] * ks[:, t, :, :, None] * v[:, t, :, None, :]
        n = fg * n + ig * ks[:, t]
        num = torch.einsum("bhk,bhkv->bhv", q[:, t], C)
        den = torch.einsum("bhk,bhk->bh", q[:, t], n).abs().clamp_min(1.0)
        assert torch.allclose(h1[:, t], num / den[..., None], atol=1e-10)
    assert torch.allclose(h2, h1[:, 6:], atol=1e-12)  # carried (S, m) continue exactly
    assert set(st) == {"S", "m"}


def test_mlstm_stabilizer_matches_its_recursion_and_resets_per_document():
    log_i, log_f = torch.randn(1, 12, 3, dtype=torch.float64), -torch.rand(1, 12, 3, dtype=torch.float64)
    cu = torch.tensor([0, 5, 5, 12])
    m0 = torch.randn(3, 3, dtype=torch.float64)
    m, m_prev, last = mlstm_stabilizer(log_i, log_f, m0, cu)
    for n, (s, e) in enumerate([(0, 5), (5, 5), (5, 12)]):
        cur = m0[n]
        for t in range(s, e):
            assert torch.allclose(m_prev[0, t], cur)
            cur = torch.maximum(log_f[0, t] + cur, log_i[0, t])
            assert torch.allclose(m[0, t], cur, atol=1e-12)
        assert torch.allclose(last[n], cur)


def test_mamba2_matches_its_ssm_equations_step_by_step():
    m = make("mamba2")
    Bsz, T = 2, 9
    x = torch.randn(Bsz, T, D, dtype=torch.float64)
    y, _ = m(x)
    G, N, H, P, E = m.n_groups, m.d_state, m.n_heads, m.value_dim, m.d_inner
    z, xBC, dt = (x @ m.in_proj.weight.T).split([E, E + 2 * G * N, H], -1)
    conv = m.convs["xBC"]
    W = conv.kernel_size
    pad = F.pad(xBC, (0, 0, W - 1, 0))
    xBC = F.silu(sum(pad[:, j : j + T] * conv.weight[:, j] for j in range(W)) + conv.bias)
    xs, Bm, Cm = xBC.split([E, G * N, G * N], -1)
    xs, Bm, Cm = xs.view(Bsz, T, H, P), Bm.view(Bsz, T, G, N), Cm.view(Bsz, T, G, N)
    dt = F.softplus(dt + m.dt_bias)
    A = -torch.exp(m.A_log)
    h = torch.zeros(Bsz, H, P, N, dtype=torch.float64)
    out = torch.zeros(Bsz, T, H, P, dtype=torch.float64)
    for t in range(T):
        for hd in range(H):
            g = hd // (H // G)
            h[:, hd] = (dt[:, t, hd] * A[hd]).exp()[:, None, None] * h[:, hd] + dt[:, t, hd, None, None] * xs[
                :, t, hd, :, None
            ] * Bm[:, t, g, None, :]
            out[:, t, hd] = torch.einsum("bpn,bn->bp", h[:, hd], Cm[:, t, g]) + m.D[hd] * xs[:, t, hd]
    yz = (out.reshape(Bsz, T, E) * F.silu(z)).view(Bsz, T, G, -1)
    yz = (yz * torch.rsqrt(yz.pow(2).mean(-1, keepdim=True) + m.norm_eps)).flatten(-2) * m.norm_weight
    assert_close(y, yz @ m.o_proj.weight.T)


# ---- the skeleton ------------------------------------------------------------------------------------


def _ctx(m):
    from effarch.layers.linear_mixer import Context

    return Context(m, None, None)


@pytest.mark.parametrize("name", MIXERS)
def test_fast_forms_equal_the_reference_loop_across_chunks(name):
    m = make(name)
    x = torch.randn(1, 70, D, dtype=torch.float64)  # longer than one chunk, not a multiple of it
    y, st = m(x[:, :67])
    y2, st2 = m(x[:, 67:], st)
    m.backend = "reference"
    y_ref, st_ref = m(x[:, :67])
    y2_ref, _ = m(x[:, 67:], st_ref)
    assert_close(torch.cat([y, y2], 1), torch.cat([y_ref, y2_ref], 1))
    assert_close(st["S"], st_ref["S"])


@pytest.mark.parametrize("name", MIXERS)
def test_decoding_state_does_not_grow(name):
    m = make(name, dtype=torch.float32)
    with torch.no_grad():
        _, short = m(torch.randn(1, 10, D))
        _, long = m(torch.randn(1, 1000, D))
        _, step = m(torch.randn(1, 1, D), long)
    assert short.nbytes() == long.nbytes() == step.nbytes() == m.state_nbytes(1000, 1, torch.float32)
    assert long["S"].dtype == torch.float32 and torch.isfinite(step["S"]).all()
    assert step.seq_len == 1001


@pytest.mark.parametrize("name", ["gla", "mamba2", "rwkv6"])
def test_state_bytes_in_bfloat16_count_float32_matrix_and_bf16_tails(name):
    m = make(name, dtype=torch.bfloat16, **({"conv_size": 4} if name == "gla" else {}))
    with torch.no_grad():
        y, st = m(torch.randn(2, 6, D, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and st["S"].dtype == torch.float32
    assert st.nbytes() == m.state_nbytes(6, 2, torch.bfloat16)
    assert any(t.dtype == torch.bfloat16 for t in st.values())


def test_bidirectional_is_the_sum_of_both_directions_and_refuses_a_state():
    m = make("linear_attn", causal=False, normalize=False)
    x = torch.randn(1, 8, D, dtype=torch.float64)
    y, state = m(x)
    assert state is None
    q, k = m.phi(m.split_heads(m.q_proj(x))), m.phi(m.split_heads(m.k_proj(x)))
    v = m.split_heads(m.v_proj(x))
    A = torch.einsum("bthk,bshk->bhts", q, k) * m.scale
    both = A.tril() + A.triu()  # each direction includes the current token
    assert_close(y, m.o_proj(torch.einsum("bhts,bshv->bthv", both, v).flatten(2)))
    with pytest.raises(ValueError, match="bidirectional"):
        m(x, {"S": torch.zeros(1)})


def test_token_shift_resets_at_document_starts():
    x = torch.arange(1.0, 7.0).view(1, 6, 1)
    prev, last = token_shift(x, None, torch.tensor([0, 2, 2, 6]))
    assert prev.flatten().tolist() == [0, 1, 0, 3, 4, 5]
    assert last.flatten().tolist() == [2, 0, 6]


def test_flops_per_token_doubles_when_bidirectional():
    assert make("gla", causal=False).flops_per_token(256) == 2 * make("gla").flops_per_token(256) > 0


# ---- presets -----------------------------------------------------------------------------------------


# Forward, backward, generation and cached decoding of every preset run in tests/test_model.py.
@pytest.mark.parametrize("name", PRESETS)
def test_preset_builds_at_every_size_near_the_transformers_parameter_count(name):
    entry = registry.get("preset", name)
    assert entry.family.startswith("linear/") and "arXiv" in entry.paper
    for size in ("debug", "small", "medium", "large"):
        cfg = preset_config(f"{name}:{size}")  # validated by building each layer on the meta device
        if size in ("debug", "small"):  # tiny sizes are dominated by embeddings and low-rank minimums
            continue
        with torch.device("meta"):
            n = build_model(cfg).num_parameters()
            n_ref = build_model(preset_config(f"transformer:{size}")).num_parameters()
        assert 0.6 < n / n_ref < 1.4, f"{name}:{size} has {n / 1e6:.1f}M parameters vs {n_ref / 1e6:.1f}M"


@pytest.mark.parametrize("causal", [True, False])
def test_short_conv_equals_torch_conv1d(causal):
    from effarch.layers.conv import short_conv

    x, w, b = torch.randn(2, 9, 5, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64), torch.randn(5)
    left = 3 if causal else 1
    ref = F.conv1d(F.pad(x.transpose(1, 2), (left, 3 - left)), w[:, None], b.double(), groups=5).transpose(1, 2)
    y, _ = short_conv(x, w, b.double(), causal=causal)
    assert_close(y, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", MIXERS)
def test_cuda_forms_match_cpu_float64(name):
    ref = make(name)
    x = torch.randn(2, 300, D, dtype=torch.float64)
    cu = torch.tensor([0, 100, 137, 300])
    with torch.no_grad():
        y_ref, _ = ref(x)
        packed_ref, _ = ref(x[:1], cu_seqlens=cu)
    for dtype, tol in ((torch.float32, 1e-3), (torch.bfloat16, 3e-2)):
        m = copy.deepcopy(ref).to("cuda", dtype)
        xc = x.to("cuda", dtype).requires_grad_()
        y, st = m(xc[:, :250])
        y2, _ = m(xc[:, 250:], st)
        y = torch.cat([y, y2], 1)
        assert_close(y.double().cpu(), y_ref, tol=tol)
        y.float().square().mean().backward()
        assert torch.isfinite(xc.grad).all()
        with torch.no_grad():
            packed, _ = m(xc[:1].detach(), cu_seqlens=cu.cuda())
        assert_close(packed.double().cpu(), packed_ref, tol=tol)
