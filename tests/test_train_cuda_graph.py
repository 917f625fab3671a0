"""CUDA-graph training steps: the replayed step trains like the eager one, for every arena architecture.

The graph path only exists on CUDA; on the CPU `cuda_graph=True` must leave training unchanged.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from effarch import build_model
from effarch.arena.archs import default_specs, task_config
from effarch.benchmarking import measure_train_step
from effarch.data.batches import TaskBatches
from effarch.data.tasks import mqar
from effarch.models.presets import preset_config
from effarch.train import GRAPH_WARMUP_STEPS, TrainConfig, train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def _batches(vocab=512, length=64, pairs=4):
    x, y = mqar(256, length, pairs, vocab_size=vocab, seed=1)
    return TaskBatches(x, y)


def _run(spec: str, size: str, device: str, graph: bool, steps: int = 12):
    torch.manual_seed(0)
    config = task_config(preset_config(f"{spec}:{size}"), 512, 64)
    model = build_model(config)
    cfg = TrainConfig(
        steps=steps, batch_size=16, seq_len=64, lr=2e-3, warmup_steps=2, device=device, progress=False, cuda_graph=graph
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture warns: fail the test instead
        result = train(model, _batches(), cfg)
    return result, model


def test_flag_is_a_no_op_on_cpu():
    a, ma = _run("transformer", "debug", "cpu", graph=False, steps=6)
    b, mb = _run("transformer", "debug", "cpu", graph=True, steps=6)
    assert a.losses == b.losses
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(pa, pb)


@needs_cuda
@pytest.mark.parametrize("spec", default_specs())
def test_graph_step_trains_like_eager(spec):
    steps = GRAPH_WARMUP_STEPS + 6
    eager, m_eager = _run(spec, "debug", "cuda", graph=False, steps=steps)
    graphed, m_graph = _run(spec, "debug", "cuda", graph=True, steps=steps)
    assert len(graphed.losses) == steps
    # The first steps are the same eager code; replayed steps differ only in reduction order (the captured
    # cross-entropy masks ignored rows instead of dropping them), so the curves agree closely.
    assert graphed.losses[:GRAPH_WARMUP_STEPS] == pytest.approx(eager.losses[:GRAPH_WARMUP_STEPS], rel=1e-5)
    assert graphed.losses == pytest.approx(eager.losses, rel=2e-2)
    worst = max(
        ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6)).item()
        for a, b in zip(m_graph.parameters(), m_eager.parameters())
    )
    assert worst < 2e-2, f"parameters after training differ by {worst:.2e} (relative)"


@needs_cuda
def test_graph_step_rejects_a_new_batch_shape():
    from effarch.train import GraphedStep, make_optimizer

    torch.manual_seed(0)
    model = build_model(task_config(preset_config("transformer:debug"), 512, 64)).cuda()
    cfg = TrainConfig(steps=4, batch_size=4, seq_len=64, progress=False, device="cuda", cuda_graph=True)
    opt = make_optimizer(model, cfg)
    x, y = _batches().get(0, 4)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.autocast("cuda", dtype=torch.bfloat16):  # warm up eagerly first
        model(x.cuda(), targets=y.cuda(), return_logits=False).loss.backward()
    torch.cuda.current_stream().wait_stream(side)
    opt.zero_grad(set_to_none=True)
    step = GraphedStep(model, opt, cfg, torch.device("cuda"), x.cuda(), y.cuda())
    loss = float(step(x.cuda(), y.cuda(), 1e-3))
    assert loss == loss and loss > 0
    with pytest.raises(ValueError, match="one shape"):
        step(x[:2].cuda(), y[:2].cuda(), 1e-3)
    step.release()
    assert all(isinstance(g["lr"], float) for g in opt.param_groups)


@needs_cuda
def test_a_step_that_cannot_be_captured_trains_eagerly(monkeypatch):
    """A host read inside the step breaks capture: training warns and carries on eagerly, unchanged."""
    import effarch.train as trainer

    eager, _ = _run("transformer", "debug", "cuda", graph=False, steps=GRAPH_WARMUP_STEPS + 3)
    real = trainer.loss_fn

    def syncing_loss(model, inputs, targets, target_index=None):
        loss, aux = real(model, inputs, targets, target_index)
        float(loss.detach())  # a device-to-host read: illegal while capturing
        return loss, aux

    monkeypatch.setattr(trainer, "loss_fn", syncing_loss)
    with pytest.warns(UserWarning, match="CUDA-graph capture failed"):
        fallback, _ = _run_quiet("transformer", steps=GRAPH_WARMUP_STEPS + 3)
    assert fallback.losses == pytest.approx(eager.losses, rel=1e-5)


def _run_quiet(spec: str, steps: int):
    torch.manual_seed(0)
    model = build_model(task_config(preset_config(f"{spec}:debug"), 512, 64))
    cfg = TrainConfig(
        steps=steps, batch_size=16, seq_len=64, lr=2e-3, warmup_steps=2, device="cuda", progress=False, cuda_graph=True
    )
    return train(model, _batches(), cfg), model


class _GrowingAnswers:
    """MQAR batches whose later steps grade more positions than the first captured one had room for."""

    def __init__(self):
        self.x, self.y = mqar(256, 64, 8, vocab_size=512, seed=2)

    def get(self, step: int, batch_size: int, seed: int = 0):
        rows = torch.arange(step * batch_size, (step + 1) * batch_size) % self.x.shape[0]
        y = self.y[rows].clone()
        if step < GRAPH_WARMUP_STEPS + 2:  # one answer per row, then all eight
            kept = (y != -100).cumsum(1) <= 1
            y[~kept] = -100
        return self.x[rows], y


@needs_cuda
def test_graph_step_captures_again_for_more_scored_positions(monkeypatch):
    """The captured step scores a fixed number of rows (32 answers: room for 128); a batch with more (256) is
    captured again, and training matches the eager run throughout."""
    import effarch.train as trainer

    steps = GRAPH_WARMUP_STEPS + 6
    captured = []

    class Counted(trainer.GraphedStep):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            captured.append(self.rows)

    monkeypatch.setattr(trainer, "GraphedStep", Counted)

    def run(graph: bool):
        torch.manual_seed(0)
        model = build_model(task_config(preset_config("transformer:debug"), 512, 64))
        cfg = TrainConfig(steps=steps, batch_size=32, seq_len=64, lr=2e-3, warmup_steps=2, device="cuda",
                          progress=False, cuda_graph=graph)  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return train(model, _GrowingAnswers(), cfg)

    eager, graphed = run(False), run(True)
    assert captured == [128, 384]
    assert len(graphed.losses) == steps
    assert graphed.losses == pytest.approx(eager.losses, rel=2e-2)


def _loss(model, ids):
    return model(ids, targets=ids.roll(-1, 1), return_logits=False).loss


def test_measured_step_cuda_graph_needs_cuda():
    model = build_model(preset_config("gla:debug"))
    with pytest.raises(ValueError, match="needs a model on a CUDA device"):
        measure_train_step(model, _loss, batch=1, seq_len=16, vocab_size=64, steps=1, warmup=1, cuda_graph=True)


@needs_cuda
@pytest.mark.parametrize("spec", ["gla", "gated-deltanet", "transformer"])
def test_measured_step_replayed_trains_like_eager(spec):
    """The training benchmark's captured step (benchmarks/train_throughput.py --cuda-graph): one eager warm-up step
    and two replays leave the weights where three eager steps do, and differ from the start (the replays ran)."""
    models = []
    for graph in (False, True):
        torch.manual_seed(0)
        cfg = preset_config(f"{spec}:debug")
        model = build_model(cfg).cuda()
        start = [p.detach().clone() for p in model.parameters()]
        torch.manual_seed(1)  # the same random tokens both ways
        r = measure_train_step(
            model, _loss, batch=2, seq_len=64, vocab_size=cfg.vocab_size, steps=2, warmup=1, cuda_graph=graph,
            phases=False,
        )  # fmt: skip
        assert r["tokens_per_s"] > 0 and r["phases"] is None
        models.append(model)
    for a, b, s in zip(models[0].parameters(), models[1].parameters(), start):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)
        assert not torch.equal(b, s)


@needs_cuda
def test_eager_step_timed_phase_by_phase():
    """An eager measurement adds one step run phase by phase, synced apart: the host's issue time and the whole
    time of the forward, backward and optimizer step, each positive, the issue time within the whole; no gradients
    are left behind."""
    torch.manual_seed(0)
    cfg = preset_config("gla:debug")
    model = build_model(cfg).cuda()
    r = measure_train_step(model, _loss, batch=2, seq_len=64, vocab_size=cfg.vocab_size, steps=2, warmup=1)
    ph = r["phases"]
    names = ("forward", "backward", "optimizer")
    assert set(ph) == {f"{n}_{w}ms" for n in names for w in ("host_", "")}
    assert all(0 < ph[f"{n}_host_ms"] <= ph[f"{n}_ms"] for n in names)
    assert all(p.grad is None for p in model.parameters())
