"""The default corpus (this Python's own standard-library sources, no download) and user text data.

`load_corpus(path)` accepts a text file, a folder of text files, or a JSONL file with a "text" field, and
splits documents deterministically into train and validation by a hash of each document's name.
"""

from __future__ import annotations

import json
import os
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from effarch.data.tokenizer import EOS

TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".jsonl", ".csv", ".tex", ".html", ".c", ".h", ".js", ".toml"}
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__", "turtledemo"}


@dataclass
class Corpus:
    train: torch.Tensor  # 1-D int64 byte ids, documents separated by EOS
    val: torch.Tensor
    source: str
    n_docs: int

    @property
    def n_bytes(self) -> int:
        return int(self.train.numel() + self.val.numel())


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_documents(max_bytes: int | None) -> list[tuple[str, bytes]]:
    root = stdlib_root()
    docs, total = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP and not d.startswith("."))
        for fn in sorted(filenames):
            if fn.endswith(".py"):
                p = Path(dirpath) / fn
                data = p.read_bytes()
                if not data.strip():
                    continue
                docs.append((str(p.relative_to(root)), data))
                total += len(data)
                if max_bytes is not None and total >= max_bytes:
                    return docs
    return docs


def _is_binary(data: bytes) -> bool:
    if b"\x00" in data[:8192]:
        return True
    try:
        data[:65536].decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start < len(data[:65536]) - 4  # a multi-byte char cut at the sample's end is fine
    return False


def _read_documents(path: Path) -> list[tuple[str, bytes]]:
    if not path.exists():
        raise ValueError(
            f"--data {str(path)!r} does not exist; give a text file, a folder of text files or a JSONL file"
        )
    if path.is_dir():
        docs = []
        for p in sorted(path.rglob("*")):
            if p.is_file() and (p.suffix.lower() in TEXT_SUFFIXES or p.suffix == ""):
                data = p.read_bytes()
                if data.strip() and not _is_binary(data):
                    if p.suffix.lower() == ".jsonl":
                        docs.extend(_jsonl_documents(p, data))
                    else:
                        docs.append((str(p.relative_to(path)), data))
        if not docs:
            raise ValueError(f"--data folder {str(path)!r} holds no non-empty text files")
        return docs
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"--data file {str(path)!r} is empty; it must hold text")
    if _is_binary(data):
        raise ValueError(f"--data file {str(path)!r} is not UTF-8 text (it looks binary)")
    if path.suffix.lower() == ".jsonl":
        return _jsonl_documents(path, data)
    # One text file: paragraphs separated by blank lines become documents for the split.
    parts = [p for p in data.split(b"\n\n") if p.strip()]
    return [(f"{path.name}#{i}", p) for i, p in enumerate(parts)]


def _jsonl_documents(path: Path, data: bytes) -> list[tuple[str, bytes]]:
    docs = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(
                f"{str(path)!r} line {n} is not valid JSON; each line must be an object with a 'text' field"
            ) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f"{str(path)!r} line {n} has no string 'text' field; each line must be {{\"text\": ...}}")
        if obj["text"]:
            docs.append((f"{path.name}:{n}", obj["text"].encode("utf-8")))
    if not docs:
        raise ValueError(f"JSONL file {str(path)!r} holds no non-empty 'text' fields")
    return docs


def _pack(docs: list[bytes]) -> torch.Tensor:
    total = sum(len(d) + 1 for d in docs)
    out = torch.empty(total, dtype=torch.int64)
    pos = 0
    for d in docs:
        if d:
            out[pos : pos + len(d)] = torch.frombuffer(bytearray(d), dtype=torch.uint8).to(torch.int64)
        out[pos + len(d)] = EOS
        pos += len(d) + 1
    return out


def load_corpus(
    path: str | os.PathLike | None = None, *, val_fraction: float = 0.05, seed: int = 0, max_bytes: int | None = None
) -> Corpus:
    """Documents as packed byte ids. path None: the standard library's .py files (tests and vendored
    packages excluded), deterministic for a given Python version. `max_bytes` caps the corpus size."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be between 0 and 1")
    if path is None:
        docs = _stdlib_documents(max_bytes)
        source = f"python-stdlib-{sysconfig.get_python_version()}"
        if not docs:
            raise ValueError("no Python standard-library sources were found on this machine; pass --data")
    else:
        docs = _read_documents(Path(path))
        source = str(path)
        if max_bytes is not None:
            kept, total = [], 0
            for d in docs:
                kept.append(d)
                total += len(d[1])
                if total >= max_bytes:
                    break
            docs = kept
    bucket = max(2, round(1 / val_fraction))
    train, val = [], []
    for name, data in docs:
        (val if zlib.crc32(f"{seed}:{name}".encode()) % bucket == 0 else train).append(data)
    if not val:  # tiny inputs: hold out the last document
        val.append(train.pop())
    if not train:
        train.append(val[0])
    return Corpus(_pack(train), _pack(val), source, len(docs))
