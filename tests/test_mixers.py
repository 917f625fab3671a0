"""Contract tests run over every registered mixer: split/carry invariant, decoding, packing, state size."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from effarch import registry

D_MODEL = 64
MIXERS = registry.list_mixers()


def make_mixer(name: str, causal: bool = True):
    entry = registry.get("mixer", name)
    torch.manual_seed(1)
    m = entry.obj(D_MODEL, causal=causal, **entry.debug).double()
    # Random (not default) values for every parameter so gates, decays and norms all matter.
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


def run_pieces(m, x, cuts):
    ys, state = [], None
    prev = 0
    for c in [*cuts, x.shape[1]]:
        if c > prev:
            y, state = m(x[:, prev:c], state)
            ys.append(y)
            prev = c
    return torch.cat(ys, 1), state


@pytest.mark.parametrize("name", MIXERS)
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_split_carry_invariant(name, data):
    m = make_mixer(name)
    T = data.draw(st.integers(2, 40), label="T")
    cuts = sorted(data.draw(st.sets(st.integers(1, T - 1), max_size=4), label="cuts"))
    x = torch.randn(2, T, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        full, _ = m(x)
        pieces, _ = run_pieces(m, x, cuts)
    assert_close(pieces, full, tol=1e-9)


@pytest.mark.parametrize("name", MIXERS)
def test_prefill_then_token_by_token(name):
    m = make_mixer(name)
    x = torch.randn(2, 23, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        full, _ = m(x)
        y, state = m(x[:, :7])
        ys = [y]
        for t in range(7, 23):
            y, state = m(x[:, t : t + 1], state)
            ys.append(y)
    assert_close(torch.cat(ys, 1), full, tol=1e-9)
    assert state.seq_len == 23


@pytest.mark.parametrize("name", MIXERS)
def test_packed_documents_equal_separate(name):
    m = make_mixer(name)
    lens = [5, 1, 17, 9]
    docs = [torch.randn(1, n, D_MODEL, dtype=torch.float64) for n in lens]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    with torch.no_grad():
        packed, _ = m(torch.cat(docs, 1), cu_seqlens=cu)
        separate = torch.cat([m(d)[0] for d in docs], 1)
    assert_close(packed, separate, tol=1e-9)


@pytest.mark.parametrize("name", MIXERS)
def test_gradients_flow_to_every_parameter(name):
    m = make_mixer(name).train()
    x = torch.randn(2, 12, D_MODEL, dtype=torch.float64, requires_grad=True)
    y, _ = m(x)
    assert y.shape == x.shape
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    missing = [
        n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())
    ]
    assert not missing, f"parameters without finite gradient: {missing}"


@pytest.mark.parametrize("name", MIXERS)
def test_state_size_matches_declared_and_recurrent_states_stay_fixed(name):
    entry = registry.get("mixer", name)
    m = make_mixer(name)
    sizes = []
    with torch.no_grad():
        state = None
        for _ in range(3):
            _, state = m(torch.randn(1, 16, D_MODEL, dtype=torch.float64), state)
            sizes.append(state.nbytes())
            assert state.nbytes() == m.state_nbytes(state.seq_len, 1, torch.float64)
    if entry.recurrent:
        assert sizes[0] == sizes[1] == sizes[2], f"recurrent state grew: {sizes}"
    else:
        assert sizes[0] < sizes[1] < sizes[2]


@pytest.mark.parametrize("name", MIXERS)
def test_bidirectional_mode_sees_the_future(name):
    m = make_mixer(name, causal=False)
    x = torch.randn(1, 10, D_MODEL, dtype=torch.float64)
    x2 = x.clone()
    x2[:, -1] += 1.0
    with torch.no_grad():
        y1, _ = m(x)
        y2, _ = m(x2)
    # Changing the last token must change the first output when the mixer looks both ways.
    assert (y1[:, 0] - y2[:, 0]).abs().max() > 1e-6
