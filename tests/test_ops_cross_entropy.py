"""The chunked linear cross-entropy equals full-logits cross-entropy, in value and gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from effarch.ops.cross_entropy import linear_cross_entropy


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_matches_reference_with_gradients(chunk, dtype, static):
    N, d, vocab = 53, 24, 37
    h = torch.randn(N, d, dtype=dtype, requires_grad=True)
    w = torch.randn(vocab, d, dtype=dtype, requires_grad=True)
    y = torch.randint(0, vocab, (N,))
    y[::5] = -100
    ref = linear_cross_entropy(h, w, y, backend="reference")
    gh_ref, gw_ref = torch.autograd.grad(ref * 3.0, (h, w))
    out = linear_cross_entropy(h, w, y, chunk_size=chunk, static_shapes=static)
    gh, gw = torch.autograd.grad(out * 3.0, (h, w))
    assert_close(out.reshape(1), ref.reshape(1).to(out.dtype), tol=1e-6 if dtype == torch.float32 else 1e-12)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert_close(gh, gh_ref, tol=tol)
    assert_close(gw, gw_ref, tol=tol)


def test_batched_shapes_and_errors():
    h = torch.randn(2, 5, 8)
    w = torch.randn(11, 8)
    y = torch.randint(0, 11, (2, 5))
    ref = linear_cross_entropy(h, w, y, backend="reference")
    assert torch.allclose(linear_cross_entropy(h, w, y, chunk_size=3), ref, atol=1e-6)
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, w, y[:, :3])
    with pytest.raises(ValueError, match="weight"):
        linear_cross_entropy(h, torch.randn(11, 7), y)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("kept", [0, 1, 4])
def test_sparse_targets_match_reference(kept, static):
    """MQAR-like targets: only a few scored positions per row (or none); ignored rows get zero gradient."""
    h = torch.randn(3, 16, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    y = torch.full((3, 16), -100)
    y[:, 16 - kept :] = torch.randint(0, 13, (3, kept))
    out = linear_cross_entropy(h, w, y, chunk_size=5, static_shapes=static)
    gh, gw = torch.autograd.grad(out, (h, w))
    if kept == 0:
        assert out.item() == 0.0 and not gh.any() and not gw.any()
        return
    ref = linear_cross_entropy(h, w, y, backend="reference")
    gh_ref, gw_ref = torch.autograd.grad(ref, (h, w))
    assert_close(out.reshape(1), ref.reshape(1), tol=1e-12)
    assert_close(gh, gh_ref, tol=1e-10)
    assert_close(gw, gw_ref, tol=1e-10)
    assert not gh[:, : 16 - kept].any()


@pytest.mark.parametrize("chunk", [16, 1000])
def test_bfloat16_gradients_close_to_float32(chunk):
    """bf16 hidden states and head: both gradients take bf16 products (float32 sums across chunks) and stay
    within bf16 rounding of the float32 reference on the same rounded inputs."""
    g = torch.Generator().manual_seed(3)
    N, d, vocab = 96, 32, 200
    h = torch.randn(N, d, generator=g).bfloat16()
    w = (torch.randn(vocab, d, generator=g) * 0.3).bfloat16()
    y = torch.randint(0, vocab, (N,), generator=g)
    y[::7] = -100
    h32, w32 = h.float().requires_grad_(), w.float().requires_grad_()
    gh_ref, gw_ref = torch.autograd.grad(linear_cross_entropy(h32, w32, y, backend="reference"), (h32, w32))
    hb, wb = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = linear_cross_entropy(hb, wb, y, chunk_size=chunk)
    gh, gw = torch.autograd.grad(out, (hb, wb))
    assert gh.dtype == gw.dtype == torch.bfloat16
    assert_close(gh.float(), gh_ref, tol=1e-2)
    assert_close(gw.float(), gw_ref, tol=1e-2)
