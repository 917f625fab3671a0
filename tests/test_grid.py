"""effarch.ops.grid: host-side launch sizes and the cached index tensors of dense batches."""

from __future__ import annotations

import pytest
import torch

from effarch.ops import grid
from effarch.ops.linear.triton.layout import ChunkTable


def test_dense_offsets_are_the_sequences_starts_and_are_reused():
    a = grid.dense_offsets(3, 50, torch.device("cpu"), torch.int32)
    assert a.tolist() == [0, 50, 100, 150] and a.dtype == torch.int32
    assert grid.dense_offsets(3, 50, torch.device("cpu"), torch.int32) is a  # built once
    assert grid.dense_offsets(3, 50, torch.device("cpu"), torch.int64).dtype == torch.int64  # dtype in the key


def test_past_the_limit_new_shapes_are_built_at_each_call(monkeypatch):
    monkeypatch.setattr(grid, "_CACHE", {})
    monkeypatch.setattr(grid, "CACHE_LIMIT", 1)
    first = grid.dense_offsets(2, 7, torch.device("cpu"), torch.int64)
    other = grid.dense_offsets(2, 9, torch.device("cpu"), torch.int64)
    assert grid.dense_offsets(2, 7, torch.device("cpu"), torch.int64) is first  # kept: never evicted
    again = grid.dense_offsets(2, 9, torch.device("cpu"), torch.int64)
    assert again is not other and torch.equal(again, other)


@pytest.mark.parametrize(("n", "T", "chunk"), [(1, 64, 64), (3, 100, 64), (2, 7, 16)])
def test_dense_chunk_table_equals_the_per_sequence_one(n, T, chunk):
    """The cached dense table (built on the device without reading lengths) equals the table the varlen path builds
    from the same lengths on the host, and a second build reuses its tensors."""
    cu = grid.dense_offsets(n, T, torch.device("cpu"), torch.int64)
    dense = ChunkTable.build(cu, T, chunk)
    varlen = ChunkTable.build(cu, 0, chunk)
    for name in ("chunk_tok", "chunk_eos", "seq_chunk", "cu"):
        assert torch.equal(getattr(dense, name), getattr(varlen, name)), name
    assert (dense.n_chunks, dense.n_seqs) == (varlen.n_chunks, varlen.n_seqs)
    assert ChunkTable.build(cu, T, chunk).chunk_tok is dense.chunk_tok


def test_nothing_traced_is_kept(monkeypatch):
    monkeypatch.setattr(grid, "_CACHE", {})
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    grid.dense_offsets(4, 3, torch.device("cpu"), torch.int64)
    assert grid._CACHE == {}


def test_nothing_made_under_fake_tensors_is_kept(monkeypatch):
    # AOT autograd traces backward code under a fake tensor mode, where is_compiling() may be False.
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(grid, "_CACHE", {})
    with FakeTensorMode():
        grid.dense_offsets(4, 3, torch.device("cpu"), torch.int64)
    assert grid._CACHE == {}
    assert torch.equal(grid.dense_offsets(2, 5, torch.device("cpu"), torch.int64), torch.tensor([0, 5, 10]))
    assert len(grid._CACHE) == 1


def test_host_grid_arithmetic_is_tritons():
    """effarch.ops.grid's plain-Python cdiv and next_power_of_2 (the kernels' launch sizes) agree with Triton's."""
    triton = pytest.importorskip("triton")
    from effarch.ops.grid import cdiv, next_power_of_2

    for n in range(1, 3000):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
        for d in (1, 7, 64, 1000):
            assert cdiv(n, d) == triton.cdiv(n, d)
    assert cdiv(0, 64) == 0
