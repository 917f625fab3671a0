"""A compiled model computes what the eager one does (forward and gradients)."""

from __future__ import annotations

import torch
from conftest import assert_close

from effarch import build_model
from effarch.compile import compile_model
from effarch.models.presets import preset_config


def test_compiled_transformer_equals_eager():
    torch.manual_seed(0)
    eager = build_model(preset_config("transformer:debug"))
    compiled = build_model(preset_config("transformer:debug"))
    compiled.load_state_dict(eager.state_dict())
    compile_model(compiled)
    ids = torch.randint(0, 260, (2, 16))
    targets = torch.randint(0, 260, (2, 16))
    a = eager(ids, targets=targets)
    b = compiled(ids, targets=targets)
    assert_close(b.logits, a.logits, tol=1e-5)
    a.loss.backward()
    b.loss.backward()
    for p, q in zip(eager.parameters(), compiled.parameters()):
        assert_close(q.grad, p.grad, tol=1e-4)
