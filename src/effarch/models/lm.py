"""The causal language model: embeddings, a stack of pre-norm blocks (token mixer + FFN), a tied head.

Any registered mixer or FFN can sit in any layer; the per-layer inference states live in one `Cache`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from effarch import registry
from effarch.cache import Cache
from effarch.layers.norm import RMSNorm
from effarch.models.config import ModelConfig
from effarch.ops.cross_entropy import linear_cross_entropy


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, vocab]
    cache: Cache | None = None
    aux_loss: torch.Tensor | float = 0.0  # sum of auxiliary losses (e.g. MoE balancing)
    loss: torch.Tensor | None = None  # cross-entropy against `targets` when they are given


class Block(nn.Module):
    """x + mixer(norm(x)), then x + ffn(norm(x)); each residual add and the norm after it are one step (one fused
    kernel on CUDA, see `effarch.layers.norm.add_rms_norm`). The model hands each block's last branch output to
    the next block un-added (`residual`, `add_last=False`), so that add too runs inside the next norm."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        name = config.layer_names[layer_idx]
        type_name, opts = config.mixer_spec(name)
        self.mixer_name = name
        self.mixer = registry.get("mixer", type_name).obj(
            config.d_model, causal=config.causal, layer_idx=layer_idx, **opts
        )
        self.norm1 = RMSNorm(config.d_model, config.norm_eps)
        ffn = config.ffn_names[layer_idx]
        if ffn == "none":
            self.norm2, self.ffn = None, None
        else:
            self.norm2 = RMSNorm(config.d_model, config.norm_eps)
            self.ffn = registry.get("ffn", ffn).obj(config.d_model, layer_idx=layer_idx, **config.ffn_options)

    def forward(self, x, state=None, *, cu_seqlens=None, residual=None, add_last=True):
        """(output, state). With `residual` the block's input is residual + x, formed in norm1's pass. With
        add_last=False the output is the pair (last branch's output, stream it is to be added to), un-added."""
        if residual is None:
            h, stream = self.norm1(x), x
        else:
            h, stream = self.norm1(x, residual=residual)  # residual + x and its norm
        y, state = self.mixer(h, state, cu_seqlens=cu_seqlens)
        if self.ffn is not None:
            h, stream = self.norm2(y, residual=stream)
            y = self.ffn(h)
        return (stream + y if add_last else (y, stream)), state


class CausalLM(nn.Module):
    """Decoder-only LM. `model(input_ids, cache=None, use_cache=False)` -> ModelOutput."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for linear and embedding weights; residual outputs scaled by 1/sqrt(2 L)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:  # norms, biases, per-head constants: the modules' own init holds
                continue
            nn.init.normal_(p, 0.0, std)
            if name.endswith(("o_proj.weight", "w2.weight", "out_proj.weight")):
                p.div_(math.sqrt(2 * self.config.n_layers))
        for m in self.modules():
            if m is not self and hasattr(m, "_init_weights"):
                m._init_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: Cache | None = None,
        use_cache: bool = False,
        *,
        cu_seqlens: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        return_logits: bool = True,
        logits_at: torch.Tensor | None = None,
        target_index: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids [B, T] -> logits [B, T, vocab]. `targets` [B, T] are the tokens each position must
        predict (already shifted; -100 = ignore); with `return_logits=False` the loss is computed chunk by
        chunk without ever holding the full logits (see effarch.ops.cross_entropy). `logits_at` (1-D
        positions along T) computes the head only there: logits [B, len(logits_at), vocab] (a prefill needs
        the last position's, not T x vocab of them). `target_index` (1-D flat positions into B*T, with `targets`
        then 1-D of the same length, -100 allowed for padding) scores only those positions, in shapes that do not
        depend on the data: a CUDA-graph step whose tasks score a few tokens per sequence builds the head's
        logits for those rows alone."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, time]; got shape {tuple(input_ids.shape)}")
        if target_index is not None:
            if targets is None or return_logits or logits_at is not None:
                raise ValueError("target_index selects the scored positions: pass targets and return_logits=False")
            if target_index.dim() != 1 or targets.shape != target_index.shape:
                raise ValueError(
                    f"target_index {tuple(target_index.shape)} and targets {tuple(targets.shape)} must be 1-D and "
                    "of one length"
                )
        if logits_at is not None:
            if targets is not None:
                raise ValueError("logits_at selects positions for generation; it cannot be combined with targets")
            if logits_at.dim() != 1 or logits_at.is_floating_point():
                raise ValueError(f"logits_at must be a 1-D tensor of positions; got {tuple(logits_at.shape)}")
        # The range check syncs with the device: skip it for single-token decode steps (ids come from
        # the sampler) and while a CUDA graph is being captured.
        check = input_ids.shape[1] > 1 and not (input_ids.is_cuda and torch.cuda.is_current_stream_capturing())
        if check and input_ids.numel():
            lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()  # one device sync, not two
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}); got values in [{lo}, {hi}]")
        if cache is not None and len(cache) != len(self.blocks):
            raise ValueError(f"cache has {len(cache)} layers; the model has {len(self.blocks)}")
        new_cache = Cache(len(self.blocks)) if (use_cache or cache is not None) else None
        x = self.embed(input_ids)
        aux = 0.0
        residual = None  # each block's last add is left to the next norm (one fused pass instead of two)
        for i, block in enumerate(self.blocks):
            (x, residual), state = block(
                x, None if cache is None else cache[i], cu_seqlens=cu_seqlens, residual=residual, add_last=False
            )
            if new_cache is not None:
                new_cache[i] = state
            if block.ffn is not None and getattr(block.ffn, "aux_loss", None) is not None:
                aux = aux + block.ffn.aux_loss
        if residual is not None and (logits_at is not None or target_index is not None):
            x, residual = residual + x, None  # positions are picked from the stream itself
        if logits_at is not None:
            x = x[:, logits_at.to(x.device)]
        if target_index is not None:  # only the scored rows reach the norm and the head
            h = self.norm(x.flatten(0, 1).index_select(0, target_index))
            loss = linear_cross_entropy(h, self.lm_head.weight, targets, static_shapes=True)
            return ModelOutput(logits=None, cache=new_cache, aux_loss=aux, loss=loss)
        h = self.norm(x) if residual is None else self.norm(x, residual=residual)[0]
        logits = self.lm_head(h) if (return_logits or targets is None) else None
        loss = None
        if targets is not None:
            if logits is not None:
                flat = logits.flatten(0, 1)
                flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
                loss = F.cross_entropy(flat, targets.flatten(), ignore_index=-100)
            else:
                loss = linear_cross_entropy(h, self.lm_head.weight, targets)
        return ModelOutput(logits=logits, cache=new_cache, aux_loss=aux, loss=loss)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        seen, n = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen or (exclude_embeddings and name.startswith("embed")):
                continue
            seen.add(id(p))
            n += p.numel()
        return n

    def cache_nbytes(self, seq_len: int, batch: int = 1, dtype: torch.dtype = torch.bfloat16) -> list[int]:
        """Inference state bytes per layer after `seq_len` tokens."""
        return [b.mixer.state_nbytes(seq_len, batch, dtype) for b in self.blocks]

    def flops_per_token(self, seq_len: int) -> float:
        """Training-forward FLOPs per token: 2 * matmul params + each mixer's context term."""
        n = self.num_parameters(exclude_embeddings=True)
        if self.config.tie_embeddings:  # the tied head still costs a vocab x d matmul
            n += self.embed.weight.numel()
        return 2.0 * n + sum(b.mixer.flops_per_token(seq_len) for b in self.blocks)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int = 64,
        *,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Sample continuations with per-layer caches; returns prompt + new tokens [B, T + n].

        Keyword options (temperature, top_k, top_p, seed, eos_token_id, static_cache, cuda_graph) are those
        of `effarch.generate.generate`. With `attention_mask` [B, T] (1 = prompt token, 0 = padding, on
        the left or the right, as Hugging Face takes it) every row continues its own prompt as if alone
        (`effarch.batch_generation.generate_padded`): the new tokens follow input_ids as given, and a row
        that has emitted `eos_token_id` continues with `pad_token_id`.
        """
        if attention_mask is None:
            from effarch.generate import generate

            return generate(self, input_ids, max_new_tokens=max_new_tokens, **kwargs)
        from effarch.batch_generation import generate_padded, prompts_from_mask

        tokens, _ = generate_padded(self, prompts_from_mask(input_ids, attention_mask), max_new_tokens, **kwargs)
        return torch.cat([input_ids, tokens.to(input_ids.device)], dim=1)


def build_model(config: ModelConfig | dict | str, *, device=None, dtype=None) -> CausalLM:
    """Build the causal LM of a config (a ModelConfig, a dict, a JSON path, or a preset name)."""
    if isinstance(config, str):
        from effarch.models.presets import preset_config

        config = preset_config(config) if not config.endswith(".json") else ModelConfig.from_json(config)
    elif isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    model = CausalLM(config)
    return model.to(device=device, dtype=dtype) if (device or dtype) else model
