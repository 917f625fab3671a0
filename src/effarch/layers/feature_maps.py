"""Feature maps phi for linear attention: sim(q, k) = phi(q) . phi(k) replaces exp(q . k).

"Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention" (arXiv 2006.16236) uses
phi(x) = elu(x) + 1; identity and relu are the common simpler choices. Based ("Simple linear attention
language models balance the recall-throughput tradeoff", arXiv 2402.18668) uses the 2nd-order Taylor
expansion of exp: phi(x) = [1, x, vec(x x^T) / sqrt(2)], so phi(q) . phi(k) = 1 + q.k + (q.k)^2 / 2.
All maps act on the last dimension of [..., d] and return [..., feature_dim(name, d)].
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def identity_map(x: torch.Tensor) -> torch.Tensor:
    return x


def elu_map(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1: positive, so the normaliser q . sum(k) never vanishes."""
    return F.elu(x) + 1.0


def relu_map(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x)


def taylor_map(x: torch.Tensor) -> torch.Tensor:
    """[1, x, vec(x x^T) / sqrt(2)]: d -> 1 + d + d^2 features whose dot product is 1 + s + s^2/2, s = q.k.

    The full outer product (not its d(d+1)/2 upper triangle) keeps the map a plain reshape; Based uses
    small d (16), where the difference is a few hundred channels.
    """
    ones = x.new_ones(*x.shape[:-1], 1)
    outer = (x[..., :, None] * x[..., None, :]).flatten(-2) / math.sqrt(2.0)
    return torch.cat([ones, x, outer], dim=-1)


FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": identity_map,
    "elu": elu_map,
    "relu": relu_map,
    "taylor": taylor_map,
}


def get_feature_map(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The map called `name`; ValueError naming the valid ones otherwise."""
    if name not in FEATURE_MAPS:
        raise ValueError(f"feature_map {name!r} is not one of {', '.join(FEATURE_MAPS)}")
    return FEATURE_MAPS[name]


def feature_dim(name: str, d: int) -> int:
    """Output size of map `name` on inputs of size d."""
    get_feature_map(name)
    return 1 + d + d * d if name == "taylor" else d
