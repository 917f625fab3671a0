"""What the benchmark scripts share: the device and dtype they run at, the peer models (transformers' Llama,
fla's GLA) built at the size of an effarch preset, and the parsing and formatting of their options."""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch

from effarch.layers.ffns.mlp import default_hidden
from effarch.models.presets import SIZES


def device_and_dtype(device: str) -> tuple[torch.device, torch.dtype]:
    """The device asked for ("auto": CUDA when there is one) and its dtype: bfloat16 weights on CUDA, as the
    reference figures were measured; float32 on the CPU, where bfloat16 matmuls are slow and only a smoke run
    makes sense."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but no CUDA device is available")
    return dev, (torch.bfloat16 if dev.type == "cuda" else torch.float32)


def free_cuda_memory(dev: torch.device) -> None:
    """Collect dropped tensors (reference cycles included) and return the allocator's cached blocks."""
    if dev.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def peer_size(size: str) -> dict:
    """Width, depth, heads, FFN and vocabulary of the effarch preset size `size` (as the Transformer preset
    uses them), for peers built to match."""
    s = SIZES[size]
    d = s["d_model"]
    return dict(
        d_model=d,
        n_layers=s["n_layers"],
        n_heads=max(1, d // s["head_dim"]),
        ffn=s.get("ffn_hidden", default_hidden(d)),
        vocab=s["vocab_size"],
    )


def llama_config(size: str, max_positions: int = 32768):
    """transformers' LlamaConfig at the effarch size (SDPA attention, tied embeddings); ImportError without it."""
    from transformers import LlamaConfig

    p = peer_size(size)
    return LlamaConfig(
        hidden_size=p["d_model"],
        intermediate_size=p["ffn"],
        num_hidden_layers=p["n_layers"],
        num_attention_heads=p["n_heads"],
        num_key_value_heads=p["n_heads"],
        vocab_size=p["vocab"],
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
        # Ids 0/1/2 are ordinary tokens in random prompts; generation lengths are fixed by min_new_tokens.
        pad_token_id=0,
    )


def _llama(size: str) -> tuple[str, Callable[[], torch.nn.Module]]:
    from transformers import LlamaForCausalLM

    cfg = llama_config(size)
    return "transformers Llama (SDPA)", lambda: LlamaForCausalLM(cfg)


def _fla_gla(size: str) -> tuple[str, Callable[[], torch.nn.Module]]:
    from fla.models import GLAConfig, GLAForCausalLM

    p = peer_size(size)
    gcfg = GLAConfig(
        hidden_size=p["d_model"],
        intermediate_size=p["ffn"],
        num_hidden_layers=p["n_layers"],
        num_heads=max(1, p["n_heads"] // 2),  # as effarch's gla preset: head dim twice the size's
        vocab_size=p["vocab"],
        tie_word_embeddings=True,
        fuse_cross_entropy=True,
    )
    return "fla GLA", lambda: GLAForCausalLM(gcfg)


# peer -> (builder of (name, model builder), library named when it cannot load)
_TRAIN_PEERS = {"llama": (_llama, "transformers"), "fla-gla": (_fla_gla, "fla")}
TRAIN_PEERS = tuple(_TRAIN_PEERS)


def train_peers(
    size: str, which: tuple[str, ...] = TRAIN_PEERS
) -> tuple[list[tuple[str, Callable[[], torch.nn.Module]]], list[str]]:
    """(name, builder) of the peer models for training at `size` (`which` of TRAIN_PEERS), and notes: a library
    that is missing is a note."""
    out, notes = [], []
    for peer in which:
        build, library = _TRAIN_PEERS[peer]
        try:
            out.append(build(size))
        except Exception as e:  # noqa: BLE001 - a peer that cannot load is reported, not fatal
            notes.append(f"{library} unavailable: {e}")
    return out, notes


def parse_ints(text: str, name: str) -> list[int]:
    """ "1,64" -> [1, 64]; every value a positive integer."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"--{name} {text!r} must be a comma-separated list of positive integers, e.g. 1,64")
    return values


def tokens(n: int) -> str:
    """A token count as the tables show it: 512, 2K, 32K."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)
