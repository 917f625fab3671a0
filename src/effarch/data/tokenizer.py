"""Byte-level tokenizer: the 256 byte values plus four specials. Needs no vocabulary file and loses nothing."""

from __future__ import annotations

import torch

BOS, EOS, PAD, MASK = 256, 257, 258, 259
SPECIALS = {"<bos>": BOS, "<eos>": EOS, "<pad>": PAD, "<mask>": MASK}
VOCAB_SIZE = 260


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255; <bos>=256, <eos>=257 (document separator), <pad>=258, <mask>=259."""

    vocab_size = VOCAB_SIZE
    bos_id, eos_id, pad_id, mask_id = BOS, EOS, PAD, MASK

    def encode(self, text: str, *, add_eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ids + [EOS] if add_eos else ids

    def decode(self, ids, *, skip_special: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = bytearray()
        for i in ids:
            if 0 <= i < 256:
                out.append(i)
            elif not skip_special:
                out.extend(next(k for k, v in SPECIALS.items() if v == i).encode())
        return out.decode("utf-8", errors="replace")
