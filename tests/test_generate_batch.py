"""Batched generation from prompts of different lengths: every row continues exactly as if alone."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from effarch import build_model, list_presets, registry
from effarch.batch_generation import generate_batch, generate_padded, prompts_from_mask
from effarch.cache import KVCache, StaticKVCache
from effarch.models.presets import preset_config

PRESETS = list_presets()
LENGTHS = [1, 5, 17]  # 17 is longer than the debug window (16) of transformer-swa and samba
D_MODEL = 64


def lively_model(name: str, dtype=torch.float64):
    """Debug-size preset with larger random weights, so greedy continuations vary from token to token
    (at the default init a tiny model mostly repeats its input, which would hide position mistakes)."""
    torch.manual_seed(0)
    model = build_model(preset_config(f"{name}:debug")).to(dtype)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in pname:
                p.normal_(0.0, 0.9 / p.shape[-1] ** 0.5)
    return model.eval()


def random_prompts(lengths, vocab: int = 256, device=None) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=g).to(device) for n in lengths]


def alone(model, prompt: torch.Tensor, n: int, **kw) -> torch.Tensor:
    return model.generate(prompt[None], n, temperature=0, **kw)[0, prompt.numel() :]


@pytest.mark.parametrize("name", PRESETS)
def test_batch_equals_each_prompt_alone(name):
    model = lively_model(name)
    prompts = random_prompts(LENGTHS)
    expected = [alone(model, p, 6) for p in prompts]
    assert len({tuple(e.tolist()) for e in expected}) > 1 and any(len(set(e.tolist())) > 1 for e in expected)
    for static in (False, True):
        got = generate_batch(model, prompts, 6, temperature=0, static_cache=static)
        for i, (g, e) in enumerate(zip(got, expected)):
            assert torch.equal(g, e), f"static_cache={static}, prompt {i} (length {LENGTHS[i]}): {g} != {e}"


@pytest.mark.parametrize("name", ["transformer-swa", "samba"])
def test_windowed_models_with_prompts_past_the_window(name):
    model = lively_model(name)
    window = model.blocks[-1].mixer.window
    lengths = [2, window + 9, window - 1]
    prompts = random_prompts(lengths)
    expected = [alone(model, p, window + 3) for p in prompts]  # decoding crosses the window as well
    for static in (False, True):
        got = generate_batch(model, prompts, window + 3, temperature=0, static_cache=static)
        assert all(torch.equal(g, e) for g, e in zip(got, expected)), f"static_cache={static}"


def make_mixer(name: str):
    entry = registry.get("mixer", name)
    torch.manual_seed(1)
    m = entry.obj(D_MODEL, **entry.debug).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.eval()


@pytest.mark.parametrize("name", registry.list_mixers())
def test_packed_states_continue_as_one_batch(name):
    """A packed call's states (one per document) continued as a batch of rows equal each document run
    alone; for attention also through a static cache."""
    m = make_mixer(name)
    docs = [torch.randn(1, n + 4, D_MODEL, dtype=torch.float64) for n in LENGTHS]
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])
    with torch.no_grad():
        separate = [m(d)[0][:, n:] for d, n in zip(docs, LENGTHS)]
        _, packed = m(torch.cat([d[:, :n] for d, n in zip(docs, LENGTHS)], 1), cu_seqlens=cu)
        states = [packed] + ([StaticKVCache.from_kv(packed, max(LENGTHS) + 4)] if isinstance(packed, KVCache) else [])
        for state in states:
            ys = []
            for t in range(4):
                y, state = m(torch.cat([d[:, n + t : n + t + 1] for d, n in zip(docs, LENGTHS)]), state)
                ys.append(y)
            for i, ref in enumerate(separate):
                assert_close(torch.cat(ys, 1)[i : i + 1], ref, tol=1e-9)


def test_padded_masks_left_and_right_give_the_same_continuations():
    model = lively_model("hybrid-gdn")
    prompts = random_prompts(LENGTHS)
    T, pad = max(LENGTHS), 258
    left = torch.full((3, T), pad)
    right = torch.full((3, T), pad)
    mask_left, mask_right = torch.zeros(3, T, dtype=torch.long), torch.zeros(3, T, dtype=torch.long)
    for i, p in enumerate(prompts):
        left[i, T - p.numel() :], mask_left[i, T - p.numel() :] = p, 1
        right[i, : p.numel()], mask_right[i, : p.numel()] = p, 1
    a = model.generate(left, 5, attention_mask=mask_left, temperature=0)
    b = model.generate(right, 5, attention_mask=mask_right, temperature=0)
    assert a.shape == (3, T + 5) and torch.equal(a[:, :T], left)
    assert torch.equal(a[:, T:], b[:, T:])
    for i, p in enumerate(prompts):
        assert torch.equal(a[i, T:], alone(model, p, 5))
    assert [p.tolist() for p in prompts_from_mask(right, mask_right)] == [p.tolist() for p in prompts]


def test_rows_stop_at_their_own_eos_and_then_pad():
    model = lively_model("transformer")
    prompts = random_prompts(LENGTHS)
    free = [alone(model, p, 8) for p in prompts]
    eos = int(free[1][2])  # row 1 stops at its third token; other rows stop where this id first appears
    tokens, lengths = generate_padded(model, prompts, 8, temperature=0, eos_token_id=eos, pad_token_id=258)
    assert tokens.shape == (3, 8)
    for i, f in enumerate(free):
        hits = (f == eos).nonzero()
        n = int(hits[0]) + 1 if hits.numel() else 8
        assert int(lengths[i]) == n
        assert torch.equal(tokens[i, :n], f[:n]) and bool((tokens[i, n:] == 258).all())
    assert int(lengths[1]) <= 3
    rows = generate_batch(model, prompts, 8, temperature=0, eos_token_id=eos)
    assert [r.numel() for r in rows] == lengths.tolist()


def test_prompts_of_one_length_take_the_plain_batched_path():
    model = lively_model("retnet")
    prompts = random_prompts([6, 6])
    got = generate_batch(model, [p.tolist() for p in prompts], 5, temperature=0, prefill_chunk=4)
    assert all(torch.equal(g, alone(model, p, 5)) for g, p in zip(got, prompts))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: generate_batch(m, [[1, 2], []], 3), "prompt 1 is empty"),
        (lambda m: generate_batch(m, [], 3), "non-empty list"),
        (lambda m: generate_batch(m, [[[1, 2]]], 3), "prompt 0 must be a 1-D"),
        (lambda m: generate_batch(m, [[1, 2], [3]], 3, prefill_chunk=2), "needs prompts of one length"),
        (lambda m: generate_batch(m, [[1, 2]], -1), "max_new_tokens=-1"),
        (lambda m: m.generate(torch.ones(2, 4, dtype=torch.long), 3, attention_mask=torch.ones(2, 5)), "shape"),
        (lambda m: m.generate(torch.ones(2, 4, dtype=torch.long), 3, attention_mask=torch.full((2, 4), 2)), "only 0"),
        (
            lambda m: m.generate(
                torch.ones(2, 3, dtype=torch.long), 3, attention_mask=torch.tensor([[1] * 3, [0] * 3])
            ),
            "row 1",
        ),
    ],
)
def test_bad_input_is_one_clear_error(call, message):
    model = lively_model("transformer")
    with pytest.raises(ValueError, match=message):
        call(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("name", PRESETS)
def test_cuda_graph_batch_equals_each_prompt_alone(name):
    model = lively_model(name, torch.float32).cuda()
    prompts = random_prompts(LENGTHS, device="cuda")
    expected = [alone(model, p, 8) for p in prompts]
    got = generate_batch(model, prompts, 8, temperature=0, cuda_graph=True)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_cli_generates_several_prompts_as_one_batch(capsys):
    from effarch.cli import main

    argv = ["generate", "--model", "gated-deltanet:debug", "--max-new-tokens", "6", "--temperature", "0"]
    samples = []
    for prompt in ("def f", "import os", "x"):
        assert main([*argv, "--prompt", prompt]) == 0
        samples.append(capsys.readouterr().out)
    assert main([*argv, "--prompt", "def f", "--prompt", "import os", "--prompt", "x"]) == 0
    out = capsys.readouterr().out
    assert out == "".join(f"--- sample {i + 1} ---\n{s}" for i, s in enumerate(samples))
    assert main([*argv, "--prompt", "def f", "--prompt", ""]) == 2
    assert "--prompt must not be empty" in capsys.readouterr().err
