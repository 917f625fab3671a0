"""Dense attention: the SDPA path equals the explicit-softmax reference for every mask kind."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from effarch.ops.attention import attention, attention_mask


@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize(
    "tq, tk, causal, window",
    [
        (13, 13, True, None),
        (13, 13, False, None),
        (1, 20, True, None),
        (5, 20, True, None),
        (13, 13, True, 4),
        (3, 20, True, 6),
    ],
)
def test_sdpa_path_equals_reference(hq, hkv, tq, tk, causal, window):
    q = torch.randn(2, tq, hq, 8, dtype=torch.float64)
    k, v = torch.randn(2, tk, hkv, 8, dtype=torch.float64), torch.randn(2, tk, hkv, 8, dtype=torch.float64)
    ref = attention(q, k, v, causal=causal, window=window, backend="reference")
    out = attention(q, k, v, causal=causal, window=window)
    assert_close(out, ref, tol=1e-12)


@pytest.mark.parametrize("T, window", [(9, 4), (16, 4), (37, 8), (37, 3), (12, 1), (64, 5)])
@pytest.mark.parametrize("hq, hkv", [(4, 4), (4, 2)])
def test_blocked_sliding_window_equals_reference_with_gradients(T, window, hq, hkv):
    """Long sequences take the blocked path (T > 2 x window: each block of queries against two blocks of keys),
    lengths that are and are not multiples of the window, windows of one token, grouped heads, Dv != D."""
    q = torch.randn(2, T, hq, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, T, hkv, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, T, hkv, 6, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, T, hq, 6, dtype=torch.float64)
    ref = attention(q, k, v, window=window, backend="reference")
    out = attention(q, k, v, window=window)
    assert_close(out, ref, tol=1e-12)
    grads = torch.autograd.grad((out * up).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * up).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        assert_close(a, b, tol=1e-12)


def test_blocked_sliding_window_never_builds_a_full_mask(monkeypatch):
    import effarch.ops.attention.dense as dense

    def no_full_mask(*a, **kw):
        raise AssertionError("a [T, T] mask was built")

    monkeypatch.setattr(dense, "attention_mask", no_full_mask)
    q, k, v = (torch.randn(1, 40, 2, 4) for _ in range(3))
    assert attention(q, k, v, window=8).shape == (1, 40, 2, 4)


def test_causal_alignment_is_bottom_right_and_windows_are_bounded():
    keep = attention_mask(2, 5, causal=True, window=2)
    assert keep.tolist() == [[False, False, True, True, False], [False, False, False, True, True]]


def test_packed_documents_do_not_see_each_other():
    lens = [3, 1, 6]
    cu = torch.tensor([0, 3, 4, 10])
    q, k, v = (torch.randn(1, 10, 2, 4, dtype=torch.float64) for _ in range(3))
    packed = attention(q, k, v, cu_seqlens=cu)
    parts, s = [], 0
    for n in lens:
        parts.append(attention(q[:, s : s + n], k[:, s : s + n], v[:, s : s + n]))
        s += n
    assert_close(packed, torch.cat(parts, 1), tol=1e-12)


def test_bad_shapes():
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="multiple"):
        attention(q, torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8))
    with pytest.raises(ValueError, match=r"\[B, T, H, D\]"):
        attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="backend"):
        attention(q, q, q, backend="flash9")
