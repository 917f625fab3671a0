"""Cross-entropy of a linear head without the full logits tensor: chunked over tokens, with the gradient
computed in the same pass.

For hidden states h [N, d], head weight W [vocab, d] and targets y [N] (-100 = ignore), the loss is
mean_i(logsumexp(h_i W^T) - (h_i W^T)_{y_i}) over kept tokens. Per chunk of tokens the logits are formed,
reduced, and turned at once into d loss/d h = (softmax - onehot) W / n and d loss/d W += (softmax - onehot)^T h / n,
so peak memory holds one chunk's logits instead of N x vocab (4 GiB in fp32 at 32K tokens x 32K vocab).
"""

from __future__ import annotations

import torch

from effarch.ops import fused


def scored_rows(targets: torch.Tensor) -> torch.Tensor:
    """Flat positions of the targets that are scored (not -100), found where the targets are (no device sync for
    targets on the host)."""
    return (targets.reshape(-1) != -100).nonzero().squeeze(1)


def linear_cross_entropy_reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The spec: full logits in float32, then torch's cross-entropy."""
    logits = h @ weight.t()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100)


def _chunk_step(hc, weight, yc, keep, denom, acc, want_grad: bool, kernel: bool):
    """One chunk: (its summed loss, d loss / d logits = (softmax - onehot) keep / denom in the weight's dtype, or
    None without `want_grad`). `kernel`: the logits' reductions and gradient in one Triton pass per row
    (effarch.ops.fused.ce_rows); otherwise in PyTorch, in float32."""
    logits = hc @ weight.t()  # [C, vocab], the only large temporary
    if kernel:
        from effarch.ops.fused.ce_rows import ce_rows_

        scale = None
        if want_grad:
            scale = torch.full_like(yc, 1.0 / denom, dtype=torch.float32) if keep is None else keep / denom
        row_loss = ce_rows_(logits, yc, scale).to(acc)
        g = logits if want_grad else None
    else:
        logits = logits.to(acc)
        lse = torch.logsumexp(logits, dim=-1)
        row_loss = lse - logits.gather(1, yc[:, None]).squeeze(1)
        g = None
        if want_grad:  # in place on the logits buffer
            g = logits.sub_(lse[:, None]).exp_()
            g.scatter_add_(1, yc[:, None], -torch.ones_like(lse)[:, None])
            g = g.mul_(1.0 / denom if keep is None else (keep[:, None] / denom).to(acc)).to(weight.dtype)
    if keep is not None:
        row_loss = row_loss.masked_fill(~keep, 0)
    return row_loss.sum(), g


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk_size: int, masked: bool, kernel: bool):
        # Unmasked, the caller passes only kept rows (no -100 left), so their count is a shape (no device
        # sync). Masked, ignored rows stay and are zeroed: shapes never depend on the data (CUDA graphs).
        acc = torch.promote_types(h.dtype, torch.float32)  # float32, or float64 for float64 inputs
        if masked:
            keep = targets != -100
            denom = keep.sum().clamp_min(1).to(acc)
            targets = targets.clamp_min(0)
        else:
            keep, denom = None, max(targets.shape[0], 1)
        needs_h, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(h) if needs_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if needs_w else None
        total = torch.zeros((), dtype=acc, device=h.device)
        for start in range(0, h.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            hc, kc = h[rows], None if keep is None else keep[rows]
            loss, g = _chunk_step(hc, weight, targets[rows], kc, denom, acc, needs_h or needs_w, kernel)
            total += loss
            if needs_h:
                grad_h[rows] = (g @ weight).to(h.dtype)
            if needs_w:
                # In the weight's dtype, like grad_h: a float32 product here ran on the GPU's non-tensor-core
                # path (41 ms of a 330 ms large-model step at 32K tokens); the chunks still sum in float32.
                grad_w.add_(g.t() @ hc.to(weight.dtype))  # one pass: the bf16 product added into float32
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / denom

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_size: int = 4096,
    backend: str = "auto",
    static_shapes: bool = False,
) -> torch.Tensor:
    """Mean cross-entropy of logits h @ weight^T against targets (-100 ignored).

    h [N, d] (or [B, T, d]), weight [vocab, d], targets [N] (or [B, T]). backend "reference" builds the
    full logits; "torch" runs the chunked form in PyTorch, "triton" with each chunk's softmax and gradient in one
    Triton pass per row (effarch.ops.fused.ce_rows), "auto" the Triton pass where the fused kernels are on
    (effarch.ops.fused.enabled: CUDA, unless turned off) and PyTorch elsewhere. `static_shapes=True` keeps ignored rows (masked)
    instead of dropping them, so no shape depends on the data; it is chosen by itself during CUDA-graph capture.
    """
    h2, t2 = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if h2.shape[0] != t2.shape[0]:
        raise ValueError(f"linear_cross_entropy: {h2.shape[0]} hidden rows but {t2.shape[0]} targets")
    if weight.dim() != 2 or weight.shape[1] != h2.shape[1]:
        raise ValueError(f"linear_cross_entropy: weight {tuple(weight.shape)} does not match hidden size {h2.shape[1]}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be positive")
    if backend == "reference":
        return linear_cross_entropy_reference(h2, weight, t2)
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(
            f"linear_cross_entropy backend {backend!r} is not one of 'auto', 'torch', 'triton', 'reference'"
        )
    if backend == "auto":
        kernel = fused.enabled(h2.device, weight.dtype) and h2.dtype == weight.dtype
    else:
        kernel = backend == "triton" and fused.use_triton("triton", h2, weight)
    # Tasks that score a few positions (MQAR: 4 answers in 64 tokens) leave most targets ignored: only the
    # kept rows go through the head, so the chunk loop shrinks with them (one device sync to find them).
    # While a CUDA graph is captured (or with static_shapes) every row stays and ignored ones are masked.
    capturing = h2.is_cuda and torch.cuda.is_current_stream_capturing()
    if static_shapes or capturing:
        return _ChunkedLinearCrossEntropy.apply(h2, weight, t2, chunk_size, True, kernel)
    kept = scored_rows(t2)
    if kept.numel() < t2.numel():
        h2, t2 = h2.index_select(0, kept), t2.index_select(0, kept)  # from here on every row is kept
    return _ChunkedLinearCrossEntropy.apply(h2, weight, t2, chunk_size, False, kernel)
