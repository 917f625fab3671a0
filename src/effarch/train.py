"""The training loop: AdamW, warmup + cosine decay, clipping, accumulation, bf16 autocast on CUDA,
validation loss and bits-per-byte, atomic checkpoints and exact resume.

Batches are pure functions of (seed, step) (see effarch.data.batches), so a run resumed from a
checkpoint sees exactly the batches, learning rates and optimizer state of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from effarch.cuda_graphs import capture, warm_up
from effarch.ops.cross_entropy import scored_rows
from effarch.utils import atomic_write_text, default_device

LN2 = math.log(2.0)


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    grad_accum: int = 1
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: int = 8
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 on CPU; or "fp32" / "bf16"
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # 0: only at the end (when checkpoint_dir is set)
    keep_checkpoints: int = 2
    max_time_s: float | None = None
    progress: bool = True
    # Replay each step (forward, backward, clipping, AdamW) as one captured CUDA graph: small models are
    # bound by kernel launches, and a replay launches the whole step at once. CUDA only, grad_accum 1, fixed
    # batch shapes; a model that cannot be captured trains eagerly (with a warning).
    cuda_graph: bool = False
    # In a captured step, build the head's logits only for the positions the batch scores when they are at most
    # half of them (tasks that grade a few answers per sequence); False scores every position, ignored ones masked.
    graph_scored_rows: bool = True

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "keep_checkpoints")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r} must be a positive integer")
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} must be positive")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"dtype={self.dtype!r} is not one of 'auto', 'fp32', 'bf16'")
        self.betas = tuple(self.betas)


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    val_loss: float | None = None
    val_bpb: float | None = None
    val_accuracy: float | None = None
    tokens_per_s: float = 0.0
    steps: int = 0
    elapsed_s: float = 0.0
    peak_mem_bytes: int | None = None
    evals: list[dict] = field(default_factory=list)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _resolve_device(name: str) -> torch.device:
    return default_device() if name == "auto" else torch.device(name)


def _autocast(device: torch.device, dtype: str, cache_enabled: bool = True):
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16, cache_enabled=cache_enabled)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norms, biases, per-head constants) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    seen, decay, no_decay = set(), [], []
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).is_cuda
    # capturable: the step count lives on the device, so the step can be captured in a CUDA graph.
    capturable = fused and cfg.cuda_graph
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None, capturable=capturable)


def loss_fn(
    model, inputs: torch.Tensor, targets: torch.Tensor, target_index: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(task loss, aux loss). Cross-entropy over targets != -100, in float32, without full logits. With
    `target_index`, targets are 1-D: the targets of those flat positions (see CausalLM.forward)."""
    extra = {} if target_index is None else {"target_index": target_index}
    out = model(inputs, targets=targets, return_logits=False, **extra)
    loss = out.loss
    aux = out.aux_loss if isinstance(out.aux_loss, torch.Tensor) else torch.zeros((), device=loss.device)
    return loss, aux


@torch.no_grad()
def evaluate(
    model, batches, n_batches: int, batch_size: int, seed: int = 1234, device=None, dtype: str = "auto"
) -> dict:
    """Mean loss (nats/token), bits per token (= bits per byte for the byte tokenizer) and exact-token
    accuracy over targets != -100, on `n_batches` deterministic batches."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_loss, total_tok, correct = 0.0, 0, 0
    it = (
        batches.sequential(batch_size, n_batches)
        if hasattr(batches, "sequential")
        else (batches.get(i, batch_size, seed) for i in range(n_batches))
    )
    for inputs, targets in it:
        inputs, targets = inputs.to(device), targets.to(device)
        with _autocast(device, dtype):
            logits = model(inputs).logits
        mask = targets != -100
        total_loss += float(
            F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="sum")
        )
        total_tok += int(mask.sum())
        correct += int(((logits.argmax(-1) == targets) & mask).sum())
    model.train(was_training)
    if total_tok == 0:
        raise ValueError("evaluation found no target tokens (every target is -100)")
    loss = total_loss / total_tok
    return {"loss": loss, "bpb": loss / LN2, "accuracy": correct / total_tok, "tokens": total_tok}


# ---- checkpoints -----------------------------------------------------------------------------------
def save_checkpoint(
    directory: str | os.PathLike, model, optimizer, step: int, cfg: TrainConfig, result: TrainResult
) -> Path:
    """Write `step-N/` (weights, config, optimizer, trainer state) under a temporary name, rename it into
    place, then point `latest` at it. A kill at any moment leaves the previous checkpoint usable."""
    from safetensors.torch import save_file

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_embeddings", False):
        state.pop("lm_head.weight", None)  # tied to embed.weight
    save_file(state, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(model.config.to_json() + "\n")
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "step": step,
            "train_config": asdict(cfg),
            "losses": list(result.losses),
            "evals": list(result.evals),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
        tmp / "trainer.pt",
    )
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / "latest", final.name + "\n")
    old = sorted(p for p in root.glob("step-*") if p.is_dir() and p != final)
    for p in old[: max(0, len(old) - (cfg.keep_checkpoints - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    root = Path(directory)
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "model.safetensors").exists() else None


def load_model(path: str | os.PathLike, device=None):
    """Build the model stored in a checkpoint folder (or the `latest` one of a training run folder)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from effarch.models.config import ModelConfig
    from effarch.models.lm import CausalLM

    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {str(path)!r} does not exist")
    if (path / "latest").exists():
        path = latest_checkpoint(path) or path
    if not (path / "model.safetensors").exists() or not (path / "config.json").exists():
        raise ValueError(f"{str(path)!r} is not a checkpoint: it needs model.safetensors and config.json")
    config = ModelConfig.from_json(path / "config.json")
    model = CausalLM(config)
    try:
        state = load_file(str(path / "model.safetensors"))
    except (SafetensorError, OSError, RuntimeError) as e:
        raise ValueError(f"checkpoint weights {str(path / 'model.safetensors')!r} are corrupt ({e})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_embeddings)]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {str(path)!r} does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model.to(device) if device is not None else model


# ---- CUDA-graph training step ---------------------------------------------------------------------
GRAPH_WARMUP_STEPS = 3  # eager steps (on a side stream) before capture: allocator, autotuning, lazy init


class GraphedStep:
    """A training step captured once as a CUDA graph and replayed with new batches and learning rates.

    The step's inputs, targets and the optimizer's learning rates live in fixed device tensors that each
    call overwrites; gradients are written (not accumulated) by the graph, so no zeroing is needed. The
    captured step is the eager one: same loss, clipping and fused AdamW, with the autocast weight cache off.
    """

    def __init__(self, model, optimizer, cfg: TrainConfig, device: torch.device, inputs, targets):
        """With cfg.graph_scored_rows, the step scores at most `rows` positions per batch (`graph_rows` of this
        first batch), through the head for those rows alone; a batch with more raises `TooManyScoredRows`. Else,
        or when most positions are scored, rows is None: every position, ignored ones masked."""
        self.optimizer = optimizer
        self.rows = rows = graph_rows(targets) if cfg.graph_scored_rows else None
        self.inputs = torch.empty_like(inputs, device=device)
        self.targets = torch.empty_like(targets, device=device)
        self.index = torch.zeros(rows or 0, dtype=torch.long, device=device)
        self.row_targets = torch.full((rows or 0,), -100, dtype=torch.long, device=device)
        self._load(inputs, targets)
        step_targets, index = (self.targets, None) if rows is None else (self.row_targets, self.index)

        def forward_backward():
            return _forward_backward(model, self.inputs, step_targets, cfg, device, False, target_index=index)

        if rows is not None:  # the scored-rows path once outside the capture: kernels built, workspaces allocated
            warm_up(forward_backward, device)
        for group in optimizer.param_groups:  # the graph reads the learning rate from device memory
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        optimizer.zero_grad(set_to_none=True)  # gradients are then allocated inside the graph's pool

        def step() -> torch.Tensor:
            loss = forward_backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            return loss

        try:
            self.graph, self.loss = capture(step, device)
        except Exception:
            self.release()
            optimizer.zero_grad(set_to_none=True)
            raise

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor, lr: float) -> torch.Tensor:
        if inputs.shape != self.inputs.shape or targets.shape != self.targets.shape:
            raise ValueError(
                f"a CUDA-graph step needs batches of one shape: captured {tuple(self.inputs.shape)}, "
                f"got {tuple(inputs.shape)} (train with cuda_graph=False for varying shapes)"
            )
        self._load(inputs, targets)
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr)
        self.graph.replay()
        return self.loss

    def _load(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs.copy_(inputs, non_blocking=True)
        if self.rows is None:
            self.targets.copy_(targets, non_blocking=True)
            return
        index, row_targets = pack_scored_rows(targets, self.rows)
        self.index.copy_(index, non_blocking=True)
        self.row_targets.copy_(row_targets, non_blocking=True)

    def release(self) -> None:
        """Give the optimizer plain float learning rates back (checkpoints and eager steps expect them)."""
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"] = float(group["lr"])


class TooManyScoredRows(ValueError):
    """A batch scores more positions than the captured graph step has rows for."""


def pack_scored_rows(targets: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [rows], row targets [rows]): the scored positions and their targets, padded with position 0 and
    target -100 (ignored) to a fixed length, so a captured step can score them in fixed shapes."""
    flat = targets.reshape(-1)
    kept = scored_rows(flat)
    if kept.numel() > rows:
        raise TooManyScoredRows(f"the batch scores {kept.numel()} positions; the captured step has room for {rows}")
    index = torch.zeros(rows, dtype=torch.long, device=flat.device)
    row_targets = torch.full((rows,), -100, dtype=torch.long, device=flat.device)
    index[: kept.numel()] = kept
    row_targets[: kept.numel()] = flat[kept]
    return index, row_targets


def graph_rows(targets: torch.Tensor) -> int | None:
    """The scored-row count a captured step is built for, from its first batch: its scored positions with an
    eighth to spare, rounded up to 128, when that is at most half the batch's positions; else None (score
    every position: the head's rows would not shrink enough to matter)."""
    n, total = int((targets != -100).sum()), targets.numel()
    rows = -(-(n + n // 8 + 1) // 128) * 128
    return rows if rows <= total // 2 else None


def _forward_backward(
    model, inputs, targets, cfg: TrainConfig, device, cache_enabled: bool = True, target_index=None
) -> torch.Tensor:
    with _autocast(device, cfg.dtype, cache_enabled):
        loss, aux = loss_fn(model, inputs, targets, target_index)
    ((loss + aux) / cfg.grad_accum).backward()
    return loss.detach()


def _host_batch(train_batches, index: int, cfg: TrainConfig, device: torch.device):
    inputs, targets = train_batches.get(index, cfg.batch_size, cfg.seed)
    if device.type == "cuda" and not inputs.is_cuda:  # pinned, so the copy does not wait for the GPU
        inputs, targets = inputs.pin_memory(), targets.pin_memory()
    return inputs, targets


def _device_batch(train_batches, index: int, cfg: TrainConfig, device: torch.device):
    inputs, targets = _host_batch(train_batches, index, cfg, device)
    return inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)


# ---- the loop --------------------------------------------------------------------------------------
def train(model, train_batches, cfg: TrainConfig, val_batches=None, *, resume: bool = True) -> TrainResult:
    """Train `model` in place on `train_batches` (a StreamBatches / TaskBatches); returns the figures."""
    device = _resolve_device(cfg.device)
    model.to(device)
    model.train()
    torch.manual_seed(cfg.seed)
    optimizer = make_optimizer(model, cfg)
    result = TrainResult()
    start_step = 0
    if cfg.checkpoint_dir and resume:
        ckpt = latest_checkpoint(cfg.checkpoint_dir)
        if ckpt is not None:
            start_step = _restore(ckpt, model, optimizer, result, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True, leave=False)
    tokens, t0 = 0, time.perf_counter()
    step = start_step
    use_graph = cfg.cuda_graph and device.type == "cuda" and cfg.grad_accum == 1

    graphed, side = None, (torch.cuda.Stream(device) if use_graph else None)
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(device))
    try:
        for step in range(start_step, cfg.steps):
            lr = lr_at(step, cfg)
            total = 0.0
            if use_graph and graphed is None and step - start_step >= GRAPH_WARMUP_STEPS:
                inputs, targets = _host_batch(train_batches, step, cfg, device)
                torch.cuda.current_stream(device).wait_stream(side)
                try:
                    graphed = GraphedStep(model, optimizer, cfg, device, inputs, targets)
                except Exception as e:  # a mixer that syncs with the host cannot be captured
                    warnings.warn(
                        f"CUDA-graph capture failed ({type(e).__name__}: {e}); training eagerly", stacklevel=2
                    )
                    use_graph, side = False, None
            if graphed is not None:
                inputs, targets = _host_batch(train_batches, step, cfg, device)
                try:
                    loss = graphed(inputs, targets, lr)
                except TooManyScoredRows:  # capture again, with room for this batch
                    graphed.release()
                    graphed = GraphedStep(model, optimizer, cfg, device, inputs, targets)
                    loss = graphed(inputs, targets, lr)
                total = float(loss)
                tokens += inputs.numel()
                if not math.isfinite(total):
                    raise FloatingPointError(f"training loss became {total} at step {step}; lower the learning rate")
            else:
                with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    for micro in range(cfg.grad_accum):
                        inputs, targets = _device_batch(train_batches, step * cfg.grad_accum + micro, cfg, device)
                        total += float(_forward_backward(model, inputs, targets, cfg, device)) / cfg.grad_accum
                        tokens += inputs.numel()
                    if not math.isfinite(total):
                        raise FloatingPointError(
                            f"training loss became {total} at step {step}; lower the learning rate"
                        )
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            result.losses.append(total)
            done = step + 1
            elapsed = time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total:.3f}", tok_s=f"{tokens / max(elapsed, 1e-9):,.0f}", refresh=False)
            if val_batches is not None and cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                ev = evaluate(model, val_batches, cfg.eval_batches, cfg.batch_size, device=device, dtype=cfg.dtype)
                result.evals.append({"step": done, **ev})
            if cfg.checkpoint_dir and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < cfg.steps:
                save_checkpoint(cfg.checkpoint_dir, model, optimizer, done, cfg, result)
            if cfg.max_time_s is not None and elapsed >= cfg.max_time_s:
                break
    finally:
        if bar is not None:
            bar.close()
        if graphed is not None:
            graphed.release()
        if side is not None:
            torch.cuda.current_stream(device).wait_stream(side)
    result.steps = len(result.losses)
    result.elapsed_s = time.perf_counter() - t0
    result.tokens_per_s = tokens / max(result.elapsed_s, 1e-9)
    if device.type == "cuda":
        result.peak_mem_bytes = int(torch.cuda.max_memory_allocated(device))
    if val_batches is not None:
        ev = evaluate(model, val_batches, cfg.eval_batches, cfg.batch_size, device=device, dtype=cfg.dtype)
        result.evals.append({"step": result.steps, **ev})
        result.val_loss, result.val_bpb, result.val_accuracy = ev["loss"], ev["bpb"], ev["accuracy"]
    if cfg.checkpoint_dir:
        save_checkpoint(cfg.checkpoint_dir, model, optimizer, result.steps, cfg, result)
    return result


def _restore(ckpt: Path, model, optimizer, result: TrainResult, device) -> int:
    from safetensors.torch import load_file

    state = load_file(str(ckpt / "model.safetensors"), device=str(device))
    model.load_state_dict(state, strict=False)
    trainer = torch.load(ckpt / "trainer.pt", map_location=device, weights_only=False)
    optimizer.load_state_dict(trainer["optimizer"])
    result.losses = list(trainer["losses"])
    result.evals = list(trainer.get("evals", []))
    torch.set_rng_state(trainer["rng"].cpu())
    if trainer.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer["cuda_rng"])
    return int(trainer["step"])


def write_metrics(path: str | os.PathLike, result: TrainResult, extra: dict | None = None) -> None:
    atomic_write_text(path, json.dumps({**asdict(result), **(extra or {})}, indent=2) + "\n")
