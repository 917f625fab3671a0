"""Model-level tests over every registered preset at its debug size."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from effarch import build_model, list_presets
from effarch.data.batches import StreamBatches
from effarch.generate import sample_next
from effarch.models.presets import preset_config
from effarch.train import TrainConfig, evaluate, train

PRESETS = list_presets()


def debug_model(name: str, dtype=torch.float64):
    torch.manual_seed(0)
    return build_model(preset_config(f"{name}:debug")).to(dtype)


@pytest.mark.parametrize("name", PRESETS)
def test_forward_backward_generate(name):
    model = debug_model(name, torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 17))
    out = model(ids, targets=ids)
    assert out.logits.shape == (2, 17, model.config.vocab_size)
    (out.loss + out.aux_loss).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    gen = model.generate(ids[:, :5], max_new_tokens=6, temperature=0.9, top_k=20, seed=3)
    assert gen.shape == (2, 11) and torch.equal(gen[:, :5], ids[:, :5])


@pytest.mark.parametrize("name", PRESETS)
def test_cached_decoding_equals_recomputation(name):
    model = debug_model(name).eval()
    prompt = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        seq, cache, logits = prompt, out.cache, out.logits[:, -1]
        for _ in range(6):
            full = model(seq).logits[:, -1]  # recompute from scratch
            assert_close(logits, full, tol=1e-9)
            tok = logits.argmax(-1)
            seq = torch.cat([seq, tok[:, None]], 1)
            step = model(tok[:, None], cache=cache)
            logits, cache = step.logits[:, -1], step.cache
    assert cache.seq_len == seq.shape[1]


def test_generate_is_seeded_and_greedy_is_deterministic():
    model = debug_model("transformer", torch.float32)
    ids = torch.randint(0, 260, (1, 4))
    a = model.generate(ids, 10, temperature=1.0, seed=5)
    b = model.generate(ids, 10, temperature=1.0, seed=5)
    assert torch.equal(a, b)
    g1 = model.generate(ids, 10, temperature=0)
    g2 = model.generate(ids, 10, temperature=0)
    assert torch.equal(g1, g2)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    gen = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, 1.0, top_k=2, generator=gen)) for _ in range(50)}
    assert picks <= {2, 3} and len(picks) == 2
    picks = {int(sample_next(logits, 1.0, top_p=0.5, generator=gen)) for _ in range(50)}
    assert picks == {3}  # softmax mass of the top token is 0.64 >= 0.5
    assert int(sample_next(logits, 0.0)) == 3
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, 1.0, top_p=1.5)


def test_short_training_lowers_the_loss():
    torch.manual_seed(0)
    # A learnable stream: a repeated random pattern of 37 bytes.
    pattern = torch.randint(0, 256, (37,))
    tokens = pattern.repeat(200)
    model = build_model(preset_config("transformer:debug"))
    batches = StreamBatches(tokens, 32)
    before = evaluate(model, batches, 2, 8)["loss"]
    cfg = TrainConfig(steps=40, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=4, progress=False)
    result = train(model, batches, cfg, val_batches=batches)
    assert result.val_loss < 0.5 * before, (before, result.val_loss)
    assert result.losses[-1] < result.losses[0]


def test_loss_without_logits_equals_loss_from_logits():
    model = debug_model("transformer")
    ids = torch.randint(0, 260, (2, 13))
    targets = torch.randint(0, 260, (2, 13))
    targets[0, :4] = -100
    a = model(ids, targets=targets)
    b = model(ids, targets=targets, return_logits=False)
    assert b.logits is None
    assert_close(b.loss.reshape(1), a.loss.reshape(1), tol=1e-12)
    ga = torch.autograd.grad(a.loss, model.embed.weight)[0]
    gb = torch.autograd.grad(b.loss, model.embed.weight)[0]
    assert_close(gb, ga, tol=1e-10)


@pytest.mark.parametrize("name", PRESETS)
def test_static_cache_generation_equals_dynamic(name):
    model = debug_model(name)
    prompt = torch.randint(0, model.config.vocab_size, (2, 6))
    a = model.generate(prompt, 12, temperature=0)
    b = model.generate(prompt, 12, temperature=0, static_cache=True)
    assert torch.equal(a, b)
    out = model(prompt, use_cache=True)
    static = out.cache.to_static(20)
    ref = model(prompt[:, :1], cache=out.cache).logits
    got = model(prompt[:, :1], cache=static).logits
    assert_close(got, ref, tol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("name", PRESETS)
def test_cuda_graph_decode_equals_eager(name):
    model = debug_model(name, torch.float32).cuda()
    prompt = torch.randint(0, model.config.vocab_size, (3, 7), device="cuda")
    a = model.generate(prompt, 16, temperature=0)
    b = model.generate(prompt, 16, temperature=0, cuda_graph=True)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", PRESETS)
def test_chunked_prefill_equals_one_call(name):
    model = debug_model(name)
    prompt = torch.randint(0, model.config.vocab_size, (2, 19))
    a = model.generate(prompt, 6, temperature=0)
    b = model.generate(prompt, 6, temperature=0, prefill_chunk=5)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="chunk_size"):
        model.generate(prompt, 2, prefill_chunk=0)


@pytest.mark.parametrize("name", ["transformer-swa", "samba"])
def test_static_cache_after_the_window_has_dropped_tokens(name):
    model = debug_model(name)
    window = model.blocks[-1].mixer.window
    prompt = torch.randint(0, model.config.vocab_size, (2, window + 7))  # older keys already dropped
    a = model.generate(prompt, 10, temperature=0)
    b = model.generate(prompt, 10, temperature=0, static_cache=True)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["transformer", "gated-deltanet", "jamba"])
def test_logits_at_some_positions_equal_the_full_logits_there(name):
    torch.manual_seed(0)
    model = build_model(preset_config(f"{name}:debug")).double().eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    full = model(ids).logits
    at = torch.tensor([12, 0, 5])
    some = model(ids, logits_at=at, use_cache=True)
    assert some.logits.shape == (2, 3, model.config.vocab_size)
    assert_close(some.logits, full[:, at], tol=1e-12)
    assert some.cache is not None  # the cache still covers every position
    with pytest.raises(ValueError, match="cannot be combined with targets"):
        model(ids, targets=ids, logits_at=at)
    with pytest.raises(ValueError, match="1-D tensor of positions"):
        model(ids, logits_at=torch.tensor([[1.0]]))


def test_to_static_can_consume_the_growing_cache_layer_by_layer():
    torch.manual_seed(0)
    model = build_model(preset_config("jamba:debug")).eval()  # attention and recurrent layers
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    cache = model(ids, use_cache=True).cache
    kept = cache.to_static(20)
    other = model(ids, use_cache=True).cache
    consumed = other.to_static(20, consume=True)
    assert all(s is None for s in other.layers)
    nxt = torch.randint(0, model.config.vocab_size, (2, 1))
    a = model(nxt, cache=kept).logits
    b = model(nxt, cache=consumed).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["transformer", "gla", "hybrid-gdn", "longhorn"])
def test_deferred_residual_adds_equal_the_plain_block_chain(name):
    """The model leaves each block's last residual add to the next norm (fused there on CUDA); logits and
    gradients equal those of the blocks called one by one with their own adds (longhorn: blocks without FFNs)."""
    torch.manual_seed(0)
    model = build_model(preset_config(f"{name}:debug"))
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    out = model(ids)
    (g_model,) = torch.autograd.grad(out.logits.square().mean(), model.embed.weight)
    x = model.embed(ids)
    for block in model.blocks:
        x, _ = block(x)
    logits = model.lm_head(model.norm(x))
    (g_chain,) = torch.autograd.grad(logits.square().mean(), model.embed.weight)
    assert torch.equal(out.logits, logits)
    assert_close(g_model, g_chain, tol=1e-6)
