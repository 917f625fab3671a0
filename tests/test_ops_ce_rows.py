"""The chunked linear cross-entropy with each chunk's softmax and gradient in one Triton pass per row
(effarch.ops.fused.ce_rows) against its PyTorch form and the full-logits reference.

Without CUDA the kernel runs under the Triton interpreter at tiny shapes, in blocks of 16 vocabulary entries so
rows span several blocks with a partial last one. The loss buffer starts as NaN (fused.POISON); the gradient is
written over the logits, which hold finite values, so every gradient entry is also compared with the reference.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, spy_launches
from triton_mode import CUDA, fresh_process_only, restore_environment, run_file_in_fresh_process  # noqa: F401

pytest.importorskip("triton")

from effarch.ops import fused  # noqa: E402
from effarch.ops.cross_entropy import linear_cross_entropy  # noqa: E402
from effarch.ops.fused import ce_rows  # noqa: E402

DEV = "cuda" if CUDA else "cpu"


@pytest.fixture(autouse=True)
def _poison_and_blocks(monkeypatch):
    monkeypatch.setattr(fused, "POISON", True)
    if not CUDA:
        monkeypatch.setattr(ce_rows, "BLOCK", 16)


def test_in_fresh_process():
    run_file_in_fresh_process(__file__)


def _inputs(N, d, vocab, seed, dtype=torch.float32, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, d, generator=g) * spread).to(DEV, dtype)
    w = (torch.randn(vocab, d, generator=g) * 2.5 / d**0.5).to(DEV, dtype)  # logits of a few units
    y = torch.randint(0, vocab, (N,), generator=g).to(DEV)
    y[::5] = -100
    return h, w, y


def _loss_and_grads(backend, h, w, y, **kw):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    out = linear_cross_entropy(h, w, y, backend=backend, **kw)
    return (out, *torch.autograd.grad(out * 3.0, (h, w)))


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("chunk", [7, 1000])
@pytest.mark.parametrize(("vocab", "spread"), [(37, 1.0), (16, 1.0), (53, 30.0)])
def test_triton_rows_match_torch_and_reference(vocab, spread, chunk, static):
    """float32: loss and both gradients equal the PyTorch form to float32 rounding and the reference; vocab 37
    and 53 end in a partial block, spread 30 gives logits in the hundreds (the online max carries the row)."""
    h, w, y = _inputs(41, 24, vocab, seed=vocab, spread=spread)
    ours = _loss_and_grads("triton", h, w, y, chunk_size=chunk, static_shapes=static)
    torch_form = _loss_and_grads("torch", h, w, y, chunk_size=chunk, static_shapes=static)
    ref = _loss_and_grads("reference", h, w, y)
    for a, b, c in zip(ours, torch_form, ref, strict=True):
        assert_close(a.reshape(-1), b.reshape(-1), tol=2e-6)
        assert_close(a.reshape(-1), c.reshape(-1), tol=1e-5)


def test_triton_rows_loss_only_without_gradients():
    """Under no_grad the kernel takes only the row losses and leaves the logits alone."""
    h, w, y = _inputs(30, 16, 37, seed=5)
    with torch.no_grad():
        ours = linear_cross_entropy(h, w, y, backend="triton", chunk_size=8)
    ref = linear_cross_entropy(h, w, y, backend="reference")
    assert_close(ours.reshape(1), ref.reshape(1), tol=1e-6)


def test_kernel_rows_and_gradient_directly():
    """ce_rows_ on logits [C, V] (a view with row stride > V): the row losses and (softmax - onehot) * scale in
    place; the columns beyond V are not touched."""
    g = torch.Generator().manual_seed(9)
    base = torch.randn(6, 40, generator=g).to(DEV) * 4
    full = base.clone()
    logits = full[:, :35]
    y = torch.tensor([0, 34, 17, 3, 16, 33], device=DEV)
    scale = torch.rand(6, generator=g).to(DEV)
    expected_loss = torch.logsumexp(base[:, :35], -1) - base[:, :35].gather(1, y[:, None]).squeeze(1)
    onehot = torch.nn.functional.one_hot(y, 35).float()
    expected_grad = (torch.softmax(base[:, :35], -1) - onehot) * scale[:, None]
    loss = ce_rows.ce_rows_(logits, y, scale)
    assert_close(loss, expected_loss, tol=1e-6)
    assert_close(logits, expected_grad, tol=1e-5)
    assert torch.equal(full[:, 35:], base[:, 35:])
    with pytest.raises(ValueError, match="unit column stride"):
        ce_rows.ce_rows_(base.T, y, scale)


@pytest.mark.parametrize("chunk", [16, 1000])
def test_bfloat16_rows_close_to_float32(chunk):
    """bf16 hidden states and head: the gradient is written in bf16 over the bf16 logits, both products in bf16
    (float32 sums across chunks): within bf16 rounding of the float32 reference on the same rounded inputs."""
    h, w, y = _inputs(96, 32, 200, seed=3, dtype=torch.bfloat16)
    ours = _loss_and_grads("triton", h, w, y, chunk_size=chunk)
    ref = _loss_and_grads("reference", h.float(), w.float(), y)
    assert ours[1].dtype == ours[2].dtype == torch.bfloat16
    assert_close(ours[0].float().reshape(1), ref[0].reshape(1), tol=1e-2)
    assert_close(ours[1].float(), ref[1], tol=1e-2)
    assert_close(ours[2].float(), ref[2], tol=1e-2)


def test_backend_choice_and_errors(monkeypatch):
    """ "auto" takes the kernel where the fused kernels are on ("force" here: on the CPU under the interpreter)
    and PyTorch when they are off; an unknown backend is refused naming the valid ones."""
    h, w, y = _inputs(20, 8, 37, seed=2)
    launched = []
    spy_launches(monkeypatch, ce_rows, "_ce_rows_kernel", launched.append)
    with fused.use_fused("force"):
        linear_cross_entropy(h, w, y)
    assert len(launched) == 1
    with fused.use_fused(False):
        linear_cross_entropy(h, w, y)
    assert len(launched) == 1
    with pytest.raises(ValueError, match="'auto', 'torch', 'triton', 'reference'"):
        linear_cross_entropy(h, w, y, backend="fused")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_bf16_at_a_model_head_size():
    """A large model's head (vocab 32,000, d 1024) over 4,096 tokens in chunks of 1,024, bf16, logits of a few
    units: loss and gradients within bf16 rounding of the float32 reference and of the PyTorch form. (With a head
    of std 0.5, logits in the tens, this form was 2.1e-2 from the float32 reference on an H200: bf16's spacing at
    such logits moves each probability by up to 25%, and the PyTorch form starts from the same bf16 product.)"""
    h, w, y = _inputs(4096, 1024, 32000, seed=11, dtype=torch.bfloat16)
    ours = _loss_and_grads("triton", h, w, y, chunk_size=1024)
    torch_form = _loss_and_grads("torch", h, w, y, chunk_size=1024)
    ref = _loss_and_grads("reference", h.float(), w.float(), y)
    for a, b, c in zip(ours, torch_form, ref, strict=True):
        assert_close(a.float().reshape(-1), c.reshape(-1), tol=1e-2)
        assert_close(a.float().reshape(-1), b.float().reshape(-1), tol=1e-2)
