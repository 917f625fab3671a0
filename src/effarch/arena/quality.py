"""Quality cells: train one architecture on one task at one learning rate, then score it.

Synthetic tasks are scored by exact-token accuracy on answer positions (and whole-answer exact match)
at every evaluation length; the LM task by validation bits per byte. With a time budget, the step count
is set from a short timing of the architecture's own training step, so every cell gets the same
wall-clock share and a learning-rate schedule that runs to its end.
"""

from __future__ import annotations

import copy
import time
import zlib

import torch

from effarch.arena.archs import Arch, task_config
from effarch.arena.suites import Suite, TaskSpec
from effarch.data import tasks as task_generators
from effarch.models.lm import CausalLM

MIN_STEPS = 10
EVAL_SHARE = 0.2  # of a budgeted cell's time, for scoring
_STEP_TIMES: dict[tuple, float] = {}  # (config, task, device) -> seconds per step


def task_seed(suite_seed: int, task: TaskSpec, length: int, split: str) -> int:
    """Distinct, reproducible seeds for each task, length and split (train / test)."""
    return zlib.crc32(f"{suite_seed}:{task.kind}:{task.name}:{length}:{split}".encode())


def make_task_data(task: TaskSpec, length: int, split: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) [N, length] of a synthetic task; N = n_train or n_test."""
    gen = task_generators.TASKS[task.kind]
    n = task.n_train if split == "train" else task.n_test
    return gen(n, length, vocab_size=task.vocab_size, seed=task_seed(seed, task, length, split), **task.options)


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def calibrate_step_s(
    model: CausalLM, batches, task: TaskSpec, device: torch.device, seed: int, budget_s: float | None = None
) -> float:
    """Seconds per training step of this model on this task: the faster of two timed steps after a
    warm-up step, or fewer steps once they have used a quarter of `budget_s` (slow models). Run on a
    throw-away copy so the real run starts from the same weights."""
    from effarch.train import TrainConfig, loss_fn, make_optimizer

    probe = copy.deepcopy(model).to(device)
    opt = make_optimizer(probe, TrainConfig(lr=1e-4))
    times = []
    for i in range(3):
        x, y = batches.get(10_000 + i, task.batch_size, seed)
        x, y = x.to(device), y.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with _autocast(device):
            loss, aux = loss_fn(probe, x, y)
        (loss + aux).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        if budget_s is not None and sum(times) > 0.25 * budget_s:
            break
    del probe, opt
    return min(times[1:]) if len(times) > 1 else times[0]


@torch.no_grad()
def score(
    model: CausalLM,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int,
    device: torch.device,
    time_cap_s: float | None = None,
) -> dict:
    """Exact-token accuracy over targets != -100, and the share of examples whose every answer token is right.
    With `time_cap_s`, scoring stops after the first batch that ends past the cap (`examples` says how many
    were scored)."""
    model.eval()
    correct = total = rows_right = rows = 0
    t0 = time.perf_counter()
    for s in range(0, inputs.shape[0], batch_size):
        if time_cap_s is not None and s > 0 and time.perf_counter() - t0 > time_cap_s:
            break
        x, y = inputs[s : s + batch_size].to(device), targets[s : s + batch_size].to(device)
        with _autocast(device):
            pred = model(x).logits.argmax(-1)
        mask = y != -100
        hit = (pred == y) & mask
        correct += int(hit.sum())
        total += int(mask.sum())
        scored = mask.any(dim=1)
        rows_right += int(((hit == mask).all(dim=1) & scored).sum())
        rows += int(scored.sum())
    model.train()
    return {
        "accuracy": correct / max(total, 1),
        "exact_match": rows_right / max(rows, 1),
        "answers": total,
        "examples": rows,
    }


def quality_cell(
    arch: Arch,
    task: TaskSpec,
    lr: float,
    suite: Suite,
    device: torch.device,
    *,
    time_cap_s: float | None,
    data: dict,
) -> dict:
    """Train `arch` on `task` and score it. `data` holds the prepared tensors: data["train"] is a batch
    source, data[("test", length)] = (inputs, targets) for synthetic tasks, data["val"] for the LM task."""
    from effarch.train import TrainConfig, evaluate, train

    t_cell = time.perf_counter()
    config = task_config(arch.quality_config, task.vocab_size, max(task.lengths))
    torch.manual_seed(suite.seed)
    model = CausalLM(config)
    batches = data["train"]
    steps, step_s, train_cap = task.steps, None, suite.cell_time_cap_s
    if time_cap_s is not None:
        key = (config.to_json(), repr(task), str(device))  # the learning rates of a sweep share one timing
        if key not in _STEP_TIMES:
            _STEP_TIMES[key] = calibrate_step_s(model, batches, task, device, suite.seed, time_cap_s)
        step_s = _STEP_TIMES[key]
        # The cell's time covers the timing above, training and scoring (at most EVAL_SHARE of it).
        train_cap = max(0.5, (1 - EVAL_SHARE) * time_cap_s - (time.perf_counter() - t_cell))
        steps = min(task.steps, max(MIN_STEPS, int(train_cap / max(step_s, 1e-6))))
    cfg = TrainConfig(
        steps=steps,
        batch_size=task.batch_size,
        seq_len=task.train_len,
        lr=lr,
        warmup_steps=max(1, steps // 10),
        weight_decay=0.1,
        seed=suite.seed,
        device=str(device),
        progress=False,
        max_time_s=train_cap,
        cuda_graph=device.type == "cuda",  # quality models are small: launch-bound unless graphed
    )
    record = {
        "arch": arch.label,
        "task": task.name,
        "task_kind": task.kind,
        "lr": lr,
        "planned_steps": steps,
        "calibrated_step_s": step_s,
        "params": model.num_parameters(),
        "state_bytes": sum(model.cache_nbytes(task.train_len, 1, torch.bfloat16)),
    }
    try:
        result = train(model, batches, cfg)
    except FloatingPointError as e:
        return {**record, "status": "diverged", "note": str(e), "accuracy": 0.0}
    losses = result.losses
    record.update(
        steps=result.steps,
        stopped_by_time=result.steps < steps,
        tokens=result.steps * task.batch_size * task.train_len,
        train_s=result.elapsed_s,
        tokens_per_s=result.tokens_per_s,
        final_loss=float(sum(losses[-10:]) / len(losses[-10:])) if losses else None,
        loss_curve=losses[:: max(1, len(losses) // 50)],
    )
    if task.kind == "lm":
        val = data["val"]
        n_batches = max(1, task.n_test // task.batch_size)
        ev = evaluate(model, val, n_batches, task.batch_size, device=device)
        record.update(status="ok", bpb=ev["bpb"], val_loss=ev["loss"], accuracy=ev["accuracy"])
        return record
    # Scoring is bounded too, so a slow architecture cannot hold the run at its longest context.
    eval_cap = EVAL_SHARE * (time_cap_s or suite.cell_time_cap_s) / len(task.lengths)
    by_length = {}
    for n in task.lengths:
        x, y = data[("test", n)]
        batch = max(1, min(256, suite.eval_tokens // n))
        by_length[str(n)] = score(model, x, y, batch, device, eval_cap)
    record.update(status="ok", by_length=by_length, accuracy=by_length[str(task.train_len)]["accuracy"])
    return record
