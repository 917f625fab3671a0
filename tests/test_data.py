"""Byte tokenizer, the default corpus, user data files and deterministic batches."""

from __future__ import annotations

import json

import pytest
import torch

from effarch.data.batches import StreamBatches, TaskBatches
from effarch.data.corpus import load_corpus
from effarch.data.tokenizer import EOS, ByteTokenizer


def test_tokenizer_round_trips_unicode():
    tok = ByteTokenizer()
    text = "déf f(x):\n    return 'π' * 2  # ✓"
    ids = tok.encode(text, add_eos=True)
    assert ids[-1] == EOS and max(ids[:-1]) < 256
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=False).endswith("<eos>")


def test_default_corpus_is_deterministic_and_split():
    a = load_corpus()
    b = load_corpus()
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.source.startswith("python-stdlib")
    assert a.val.numel() > 0 and 0.01 < a.val.numel() / a.n_bytes < 0.2
    assert int((a.train == EOS).sum()) + int((a.val == EOS).sum()) == a.n_docs and a.train.max() <= EOS
    assert a.n_bytes > 1_000_000


def test_text_folder_and_jsonl(tmp_path):
    (tmp_path / "d").mkdir()
    for i in range(30):
        (tmp_path / "d" / f"f{i}.txt").write_text(f"document {i} " * 20)
    (tmp_path / "d" / "skip.bin").write_bytes(b"\x00\x01\x02")
    c = load_corpus(tmp_path / "d")
    assert c.n_docs == 30
    rows = [json.dumps({"text": f"row {i} " * 10}) for i in range(25)]
    (tmp_path / "x.jsonl").write_text("\n".join(rows) + "\n")
    c = load_corpus(tmp_path / "x.jsonl")
    assert c.n_docs == 25
    text = ByteTokenizer().decode(torch.cat([c.train, c.val]))
    assert "row 3 row 3" in text


def _write(name: str, content: bytes | None):
    def make(root):
        p = root / name
        if content is None:
            p.mkdir()
        else:
            p.write_bytes(content)
        return p

    return make


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: p / "missing.txt", "does not exist"),
        (_write("empty.txt", b""), "is empty"),
        (_write("bin.txt", b"\x00\xff" * 50), "not UTF-8 text"),
        (_write("e", None), "holds no non-empty text"),
        (_write("bad.jsonl", b"{oops\n"), "not valid JSON"),
        (_write("nt.jsonl", b'{"txt": "a"}\n'), "no string 'text' field"),
    ],
)
def test_bad_data_gives_one_clear_error(tmp_path, setup, message):
    with pytest.raises(ValueError, match=message):
        load_corpus(setup(tmp_path))


def test_batches_are_pure_functions_of_seed_and_step():
    tokens = torch.arange(1000)
    s = StreamBatches(tokens, 16)
    x1, y1 = s.get(7, 4, seed=1)
    x2, y2 = s.get(7, 4, seed=1)
    assert torch.equal(x1, x2) and torch.equal(y1[:, :-1], x1[:, 1:])
    assert not torch.equal(s.get(8, 4, seed=1)[0], x1)
    inputs = torch.randint(0, 9, (10, 6))
    t = TaskBatches(inputs, inputs.clone())
    assert torch.equal(t.get(3, 5, 0)[0], t.get(3, 5, 0)[0])
    with pytest.raises(ValueError, match="equal"):
        TaskBatches(inputs, inputs[:, :3])
