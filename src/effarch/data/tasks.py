"""Synthetic recall and copying tasks, generated offline: MQAR, selective copying, induction heads, passkey.

Every generator returns `(inputs, targets)`, int64 tensors of shape [num_examples, seq_len], and is a pure
function of its arguments (the seed included). Targets follow the next-token convention of the LM loss:
`targets[i, t]` is what the model must output after reading `inputs[i, : t + 1]`; every position that is
not scored holds -100 (ignored by the loss and by accuracy). Accuracy is exact-token accuracy over the
scored positions.
"""

from __future__ import annotations

import torch

IGNORE = -100

# Reserved ids of the copying, induction and passkey tasks (MQAR reserves only 0).
NOISE, MARKER, QUERY = 0, 1, 2


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


def _check_positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}={v!r} is invalid: it must be a positive integer")


def _distinct(num_rows: int, num_choices: int, k: int, g: torch.Generator, weights=None) -> torch.Tensor:
    """[num_rows, k] indices in [0, num_choices), distinct within each row: k draws in order without
    replacement, each with probability proportional to `weights` (uniform when None) among those left.

    Uniform: Floyd's subset sampling, then a random order (O(rows * k^2), no [rows, choices] matrix).
    Weighted: Gumbel-top-k, the k largest of log w + Gumbel noise (Kool et al., arXiv 1903.06059).
    """
    if weights is None:
        chosen = torch.empty(num_rows, k, dtype=torch.int64)
        for i, j in enumerate(range(num_choices - k, num_choices)):
            t = torch.randint(0, j + 1, (num_rows,), generator=g)
            taken = (chosen[:, :i] == t[:, None]).any(dim=1)
            chosen[:, i] = torch.where(taken, torch.full_like(t, j), t)
        order = torch.rand(num_rows, k, generator=g).argsort(dim=1)
        return chosen.gather(1, order)
    log_w = weights.to(torch.float64).log().float()
    out = torch.empty(num_rows, k, dtype=torch.int64)
    chunk = max(1, 2**22 // max(1, num_choices))
    for s in range(0, num_rows, chunk):
        n = min(chunk, num_rows - s)
        u = torch.rand(n, num_choices, generator=g).clamp_(min=1e-20)
        out[s : s + n] = (log_w - (-u.log()).log()).topk(k, dim=1).indices
    return out


def mqar(
    num_examples: int,
    seq_len: int,
    num_pairs: int,
    vocab_size: int = 8192,
    power_a: float = 0.01,
    seed: int = 0,
    *,
    random_non_queries: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-query associative recall, as defined in "Zoology: Measuring and Improving Recall in Efficient
    Language Models" (arXiv 2312.04927).

    With K = num_pairs, V = vocab_size, T = seq_len:
    - keys are K distinct ids from [1, V/2), values K distinct ids from [V/2, V);
    - positions 0 .. 2K-1 hold k_1 v_1 k_2 v_2 ... k_K v_K;
    - each key is queried once: gaps g_1..g_K are drawn without replacement from {0, .., (T-2K)/2 - 1}
      with p(g) proportional to a (g+1)^(a-1) (a = power_a; a = 1 is uniform, small a favours short
      gaps), and key k_j sits at position 2K + 2 g_j;
    - the target at a query key's position is its value; every other target is -100;
    - every other position holds 0 (or a uniform random id when `random_non_queries`).
    Requires T even, V > T and 4K <= T. Accuracy is measured on the K answer positions only.
    """
    _check_positive(num_examples=num_examples, seq_len=seq_len, num_pairs=num_pairs, vocab_size=vocab_size)
    if seq_len % 2:
        raise ValueError(f"seq_len={seq_len} is invalid for MQAR: it must be even")
    if vocab_size <= seq_len:
        raise ValueError(f"vocab_size={vocab_size} is invalid for MQAR: it must exceed seq_len={seq_len}")
    if 4 * num_pairs > seq_len:
        raise ValueError(f"num_pairs={num_pairs} is invalid for MQAR: 4 * num_pairs must be at most seq_len={seq_len}")
    if num_pairs > vocab_size // 2 - 1:
        raise ValueError(
            f"num_pairs={num_pairs} is invalid for MQAR: vocab_size={vocab_size} gives only {vocab_size // 2 - 1} keys"
        )
    if not power_a > 0:
        raise ValueError(f"power_a={power_a} is invalid: it must be positive")
    g = _generator(seed)
    N, T, K, half = num_examples, seq_len, num_pairs, vocab_size // 2
    keys = _distinct(N, half - 1, K, g) + 1  # [N, K] in [1, V/2)
    values = _distinct(N, vocab_size - half, K, g) + half  # [N, K] in [V/2, V)
    space = (T - 2 * K) // 2
    p = power_a * torch.arange(1, space + 1, dtype=torch.float64) ** (power_a - 1)
    gaps = _distinct(N, space, K, g, weights=p / p.sum())  # [N, K]
    inputs = torch.zeros(N, T, dtype=torch.int64)
    inputs[:, 0 : 2 * K : 2] = keys
    inputs[:, 1 : 2 * K : 2] = values
    query_pos = 2 * K + 2 * gaps
    inputs.scatter_(1, query_pos, keys)
    targets = torch.full((N, T), IGNORE, dtype=torch.int64)
    targets.scatter_(1, query_pos, values)
    if random_non_queries:
        filler = torch.randint(vocab_size, (N, T), generator=g)
        free = torch.ones(N, T, dtype=torch.bool)
        free[:, : 2 * K] = False
        free.scatter_(1, query_pos, False)
        inputs = torch.where(free, filler, inputs)
    return inputs, targets


def selective_copying(
    num_examples: int,
    seq_len: int,
    num_tokens: int = 16,
    vocab_size: int = 16,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective copying ("Mamba: Linear-Time Sequence Modeling with Selective State Spaces", arXiv 2312.00752).

    With n = num_tokens and C = seq_len - n:
    - positions 0 .. C-1 hold n data tokens d_1..d_n (uniform over [2, vocab_size)) at n distinct random
      positions, in that order, and the noise token 0 everywhere else;
    - positions C .. C+n-1 hold the marker token 1;
    - the target at marker j (position C + j - 1) is d_j; every other target is -100.
    The model must remember which tokens were data, in order, while ignoring the noise between them.
    """
    _check_positive(num_examples=num_examples, seq_len=seq_len, num_tokens=num_tokens, vocab_size=vocab_size)
    if vocab_size < 3:
        raise ValueError(f"vocab_size={vocab_size} is invalid for selective copying: it must be at least 3")
    if 2 * num_tokens > seq_len:
        raise ValueError(f"num_tokens={num_tokens} is invalid: 2 * num_tokens must be at most seq_len={seq_len}")
    g = _generator(seed)
    N, n = num_examples, num_tokens
    C = seq_len - n
    data = torch.randint(2, vocab_size, (N, n), generator=g)
    pos = _distinct(N, C, n, g).sort(dim=1).values
    inputs = torch.full((N, seq_len), NOISE, dtype=torch.int64)
    inputs.scatter_(1, pos, data)
    inputs[:, C:] = MARKER
    targets = torch.full((N, seq_len), IGNORE, dtype=torch.int64)
    targets[:, C:] = data
    return inputs, targets


def induction_heads(
    num_examples: int,
    seq_len: int,
    vocab_size: int = 16,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Induction heads ("In-context Learning and Induction Heads", arXiv 2209.11895; the length-generalisation
    setting of Mamba, arXiv 2312.00752).

    - every position holds a uniform random token from [3, vocab_size), except:
    - the trigger token 2 sits at one uniform random position p in [0, seq_len - 3], followed at p + 1 by
      the answer token a;
    - the last position holds the trigger 2 again, and its target is a; every other target is -100.
    The trigger appears exactly twice, so the answer is determined by one earlier bigram.
    """
    _check_positive(num_examples=num_examples, seq_len=seq_len, vocab_size=vocab_size)
    if vocab_size < 4:
        raise ValueError(f"vocab_size={vocab_size} is invalid for induction heads: it must be at least 4")
    if seq_len < 3:
        raise ValueError(f"seq_len={seq_len} is invalid for induction heads: it must be at least 3")
    g = _generator(seed)
    N = num_examples
    inputs = torch.randint(3, vocab_size, (N, seq_len), generator=g)
    p = torch.randint(0, seq_len - 2, (N, 1), generator=g)
    answer = inputs.gather(1, p + 1)
    inputs.scatter_(1, p, QUERY)
    inputs[:, -1] = QUERY
    targets = torch.full((N, seq_len), IGNORE, dtype=torch.int64)
    targets[:, -1:] = answer
    return inputs, targets


def passkey(
    num_examples: int,
    seq_len: int,
    key_len: int = 5,
    vocab_size: int = 64,
    depth: float | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Passkey retrieval ("Landmark Attention", arXiv 2305.16300): a random key hidden in long filler must
    be reproduced at the end.

    Ids: 0 = filler, 1 = key marker, 2 = query marker, 3..12 = the ten digits, 13.. = further filler
    (so the filler is uniform over {0} and [13, vocab_size)).
    - a key of `key_len` digits follows the key marker at depth `depth` of the context (a fraction in
      [0, 1]: 0 = start, 1 = just before the query; None = uniform random per example);
    - the last key_len positions hold the query marker then the first key_len - 1 key digits (teacher
      forcing), and their targets are the key_len digits; every other target is -100.
    Scored by token accuracy over the digits, or exact match of the whole key.
    """
    _check_positive(num_examples=num_examples, seq_len=seq_len, key_len=key_len, vocab_size=vocab_size)
    if vocab_size < 14:
        raise ValueError(
            f"vocab_size={vocab_size} is invalid for passkey: it must be at least 14 (3 specials, 10 digits, filler)"
        )
    if seq_len < 2 * key_len + 2:
        raise ValueError(
            f"seq_len={seq_len} is invalid for passkey: it must be at least 2 * key_len + 2 = {2 * key_len + 2}"
        )
    if depth is not None and not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} is invalid: it must be a fraction in [0, 1] or None")
    g = _generator(seed)
    N, L = num_examples, key_len
    filler = torch.randint(12, vocab_size, (N, seq_len), generator=g)
    inputs = torch.where(filler == 12, torch.zeros_like(filler), filler)  # id 12 stands for filler 0
    key = torch.randint(3, 13, (N, L), generator=g)
    ctx = seq_len - L  # the query marker's position
    last_start = ctx - (L + 1)  # the key marker and key end before the query
    if depth is None:
        start = torch.randint(0, last_start + 1, (N, 1), generator=g)
    else:
        start = torch.full((N, 1), round(depth * last_start), dtype=torch.int64)
    inputs.scatter_(1, start, MARKER)
    inputs.scatter_(1, start + 1 + torch.arange(L), key)
    inputs[:, ctx] = QUERY
    inputs[:, ctx + 1 :] = key[:, : L - 1]
    targets = torch.full((N, seq_len), IGNORE, dtype=torch.int64)
    targets[:, ctx:] = key
    return inputs, targets


TASKS = {
    "mqar": mqar,
    "selective_copying": selective_copying,
    "induction_heads": induction_heads,
    "passkey": passkey,
}

__all__ = ["IGNORE", "TASKS", "mqar", "selective_copying", "induction_heads", "passkey"]


# How many values a scored target of each task can take (for its chance accuracy).
_ANSWERS = {
    "mqar": lambda vocab: vocab - vocab // 2,  # values from the upper half
    "selective_copying": lambda vocab: vocab - 2,  # data tokens from [2, vocab)
    "induction_heads": lambda vocab: vocab - 3,  # answers from [3, vocab)
    "passkey": lambda vocab: 10,  # the ten digits
}


def chance_accuracy(kind: str, vocab_size: int) -> float:
    """Token accuracy of a uniform guess among the values a scored target of task `kind` can take (a model
    that learned nothing about the context scores about this)."""
    if kind not in _ANSWERS:
        raise ValueError(f"task kind {kind!r} has no chance level; valid kinds are {sorted(_ANSWERS)}")
    return 1.0 / _ANSWERS[kind](vocab_size)
