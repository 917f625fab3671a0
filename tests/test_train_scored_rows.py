"""Scoring only the positions a task grades: the captured training step's fixed-shape form of the loss.

Tasks such as MQAR grade a few positions per sequence (4 answers in 64 tokens); a CUDA-graph step cannot drop the
ignored rows by their data-dependent count, so it takes a fixed number of scored rows (`pack_scored_rows`) and the
model builds the head's logits for those alone (`target_index`). The loss and every gradient must equal scoring
every position.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from effarch import build_model
from effarch.arena.archs import task_config
from effarch.data.tasks import mqar
from effarch.models.presets import preset_config
from effarch.ops.cross_entropy import scored_rows
from effarch.train import TooManyScoredRows, graph_rows, loss_fn, pack_scored_rows


def _model(spec: str, vocab: int = 512, length: int = 64):
    torch.manual_seed(0)
    return build_model(task_config(preset_config(f"{spec}:debug"), vocab, length))


@pytest.mark.parametrize("spec", ["transformer", "gated-deltanet", "mamba2"])
def test_scored_rows_loss_and_gradients_equal_full_scoring(spec):
    model = _model(spec)
    x, y = mqar(6, 64, 4, vocab_size=512, seed=3)
    n = int((y != -100).sum())
    index, row_targets = pack_scored_rows(y, n + 37)  # padded rows must not count

    def run(**kwargs):
        model.zero_grad(set_to_none=True)
        loss, aux = loss_fn(model, x, **kwargs)
        (loss + aux).backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    full = run(targets=y)
    rows = run(targets=row_targets, target_index=index)
    assert rel_err(rows[0], full[0]) < 1e-6
    assert len(rows[1]) == len(full[1]) > 0
    for a, b in zip(rows[1], full[1], strict=True):
        assert rel_err(a, b) < 1e-5


def test_pack_scored_rows_exact():
    targets = torch.full((2, 5), -100)
    targets[0, 3], targets[1, 0], targets[1, 4] = 7, 9, 2
    assert scored_rows(targets).tolist() == [3, 5, 9]
    index, row_targets = pack_scored_rows(targets, 6)
    assert index.tolist() == [3, 5, 9, 0, 0, 0]
    assert row_targets.tolist() == [7, 9, 2, -100, -100, -100]
    with pytest.raises(TooManyScoredRows, match="scores 3 positions; the captured step has room for 2"):
        pack_scored_rows(targets, 2)


def test_graph_rows():
    _, sparse = mqar(512, 64, 4, vocab_size=8192, seed=0)  # 2,048 scored positions of 32,768
    rows = graph_rows(sparse)
    assert rows % 128 == 0 and 2048 + 2048 // 8 < rows <= 2048 + 2048 // 8 + 128
    dense = torch.randint(0, 100, (4, 64))
    assert graph_rows(dense) is None  # every position scored: nothing to gain
    half = dense.clone()
    half[:, ::2] = -100
    assert graph_rows(half) is None  # the padded rows would exceed half the positions


def test_target_index_needs_1d_targets_and_no_logits():
    model = _model("transformer")
    x, y = mqar(2, 64, 4, vocab_size=512, seed=0)
    index, row_targets = pack_scored_rows(y, 16)
    with pytest.raises(ValueError, match="return_logits=False"):
        model(x, targets=row_targets, target_index=index)
    with pytest.raises(ValueError, match="must be 1-D and of one length"):
        model(x, targets=row_targets[:-1], target_index=index, return_logits=False)
    with pytest.raises(ValueError, match="pass targets"):
        model(x, target_index=index, return_logits=False)
