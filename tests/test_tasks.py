"""The synthetic task generators follow their written definitions exactly (effarch.data.tasks)."""

from __future__ import annotations

import pytest
import torch

from effarch.data.tasks import IGNORE, _distinct, induction_heads, mqar, passkey, selective_copying


# ---- MQAR ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T,K,V", [(64, 4, 8192), (128, 8, 256), (32, 8, 64), (16, 1, 20)])
def test_mqar_definition(T, K, V):
    x, y = mqar(200, T, K, vocab_size=V, seed=3)
    assert x.shape == y.shape == (200, T) and x.dtype == y.dtype == torch.int64
    keys, values = x[:, 0 : 2 * K : 2], x[:, 1 : 2 * K : 2]
    assert ((keys >= 1) & (keys < V // 2)).all()
    assert ((values >= V // 2) & (values < V)).all()
    for i in range(x.shape[0]):
        assert len(set(keys[i].tolist())) == K, "keys repeat within an example"
        assert len(set(values[i].tolist())) == K, "values repeat within an example"
        answer = {int(k): int(v) for k, v in zip(keys[i], values[i])}
        scored = (y[i] != IGNORE).nonzero().flatten().tolist()
        assert len(scored) == K
        queried = []
        for p in scored:
            assert p >= 2 * K and (p - 2 * K) % 2 == 0, "a query sits at 2K + 2g"
            k = int(x[i, p])
            assert int(y[i, p]) == answer[k], "the target at a query key is its value"
            queried.append(k)
        assert sorted(queried) == sorted(answer), "every key is queried exactly once"
        rest = torch.ones(T, dtype=torch.bool)
        rest[: 2 * K] = False
        rest[scored] = False
        assert (x[i, rest] == 0).all(), "non-query positions hold 0"


def test_mqar_is_deterministic_in_its_seed():
    a, b = mqar(50, 64, 4, 256, seed=7), mqar(50, 64, 4, 256, seed=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = mqar(50, 64, 4, 256, seed=8)
    assert not torch.equal(a[0], c[0])


def test_mqar_power_law_favours_short_gaps():
    T, K = 256, 4

    def mean_gap(a):
        x, y = mqar(2000, T, K, vocab_size=512, power_a=a, seed=0)
        pos = (y != IGNORE).nonzero()[:, 1].double()
        return float(((pos - 2 * K) / 2).mean())

    uniform = (T - 2 * K) // 2 / 2 - 0.5  # mean of uniform {0 .. space - 1}
    assert abs(mean_gap(1.0) - uniform) < 3.0
    assert mean_gap(0.01) < 0.8 * uniform


def test_mqar_random_non_queries_keeps_the_task():
    x0, y0 = mqar(100, 64, 4, 256, seed=1)
    x1, y1 = mqar(100, 64, 4, 256, seed=1, random_non_queries=True)
    assert torch.equal(y0, y1)
    keep = x0 != 0
    assert torch.equal(x0[keep], x1[keep])
    assert (x1[~keep] != 0).float().mean() > 0.9


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(seq_len=63, num_pairs=4, vocab_size=256), "even"),
        (dict(seq_len=64, num_pairs=4, vocab_size=64), "exceed"),
        (dict(seq_len=64, num_pairs=17, vocab_size=256), "4 \\* num_pairs"),
        (dict(seq_len=64, num_pairs=0, vocab_size=256), "positive integer"),
        (dict(seq_len=64, num_pairs=4, vocab_size=256, power_a=0.0), "power_a"),
    ],
)
def test_mqar_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mqar(4, **kwargs)


def test_distinct_draws_are_distinct_and_uniform():
    g = torch.Generator().manual_seed(0)
    idx = _distinct(20000, 10, 3, g)
    assert ((idx >= 0) & (idx < 10)).all()
    assert (idx.sort(dim=1).values.diff(dim=1) > 0).all()
    for col in range(3):  # each draw position is uniform over the 10 choices
        freq = torch.bincount(idx[:, col], minlength=10).double() / idx.shape[0]
        assert (freq - 0.1).abs().max() < 0.015
    w = torch.tensor([100.0, 1.0, 1.0, 1.0])
    first = _distinct(5000, 4, 2, g, weights=w)[:, 0]
    assert (first == 0).double().mean() > 0.9  # drawn in order, by weight


# ---- selective copying -----------------------------------------------------------------------------
def test_selective_copying_definition():
    T, n, V = 40, 6, 10
    x, y = selective_copying(100, T, num_tokens=n, vocab_size=V, seed=2)
    C = T - n
    assert x.shape == y.shape == (100, T)
    assert (x[:, C:] == 1).all(), "markers fill the last n positions"
    assert (y[:, :C] == IGNORE).all()
    for i in range(x.shape[0]):
        ctx = x[i, :C]
        data = ctx[ctx != 0]
        assert data.numel() == n and ((data >= 2) & (data < V)).all()
        assert torch.equal(y[i, C:], data), "targets are the data tokens in order"
        assert not (ctx == 1).any()


def test_selective_copying_bad_arguments():
    with pytest.raises(ValueError, match="num_tokens"):
        selective_copying(2, 10, num_tokens=6)
    with pytest.raises(ValueError, match="vocab_size"):
        selective_copying(2, 10, num_tokens=2, vocab_size=2)


# ---- induction heads -------------------------------------------------------------------------------
def test_induction_heads_definition():
    x, y = induction_heads(300, 32, vocab_size=8, seed=4)
    assert (y[:, :-1] == IGNORE).all()
    for i in range(x.shape[0]):
        trig = (x[i] == 2).nonzero().flatten().tolist()
        assert len(trig) == 2 and trig[1] == 31, "the trigger appears once inside and once at the end"
        p = trig[0]
        assert p <= 29
        assert int(y[i, -1]) == int(x[i, p + 1]), "the answer is the token after the first trigger"
        others = torch.cat([x[i, :p], x[i, p + 1 : -1]])
        assert ((others >= 3) & (others < 8)).all()


def test_induction_heads_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        induction_heads(2, 16, vocab_size=3)
    with pytest.raises(ValueError, match="seq_len"):
        induction_heads(2, 2)


# ---- passkey ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [None, 0.0, 0.5, 1.0])
def test_passkey_definition(depth):
    T, L, V = 50, 4, 30
    x, y = passkey(100, T, key_len=L, vocab_size=V, depth=depth, seed=5)
    q = T - L
    assert (x[:, q] == 2).all(), "the query marker comes key_len positions before the end"
    assert (y[:, :q] == IGNORE).all()
    last_start = q - (L + 1)
    for i in range(x.shape[0]):
        starts = (x[i] == 1).nonzero().flatten().tolist()
        assert len(starts) == 1
        s = starts[0]
        key = x[i, s + 1 : s + 1 + L]
        assert ((key >= 3) & (key <= 12)).all()
        assert torch.equal(y[i, q:], key), "targets are the key digits"
        assert torch.equal(x[i, q + 1 :], key[:-1]), "the answer is teacher-forced"
        filler = torch.cat([x[i, :s], x[i, s + 1 + L : q]])
        assert ((filler == 0) | (filler >= 13)).all(), "filler holds no markers or digits"
        assert filler.max() < V
        if depth is not None:
            assert s == round(depth * last_start)


def test_passkey_bad_arguments():
    with pytest.raises(ValueError, match="depth"):
        passkey(2, 32, depth=1.5)
    with pytest.raises(ValueError, match="seq_len"):
        passkey(2, 10, key_len=5)
    with pytest.raises(ValueError, match="vocab_size"):
        passkey(2, 32, vocab_size=13)


@pytest.mark.parametrize(
    ("kind", "make"),
    [
        ("mqar", lambda V: mqar(400, 16, 4, vocab_size=V, seed=3)),
        ("selective_copying", lambda V: selective_copying(400, 32, num_tokens=4, vocab_size=V, seed=3)),
        ("induction_heads", lambda V: induction_heads(2000, 16, vocab_size=V, seed=3)),
        ("passkey", lambda V: passkey(400, 64, key_len=5, vocab_size=V, seed=3)),
    ],
)
def test_chance_accuracy_is_one_over_the_answers_a_target_can_take(kind, make):
    from effarch.data.tasks import chance_accuracy

    V = 24
    _, targets = make(V)
    answers = targets[targets != IGNORE].unique()
    assert chance_accuracy(kind, V) == pytest.approx(1.0 / answers.numel())  # every possible answer occurs


def test_chance_accuracy_rejects_an_unknown_kind():
    from effarch.data.tasks import chance_accuracy

    with pytest.raises(ValueError, match="valid kinds"):
        chance_accuracy("lm", 260)
