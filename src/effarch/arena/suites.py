"""Arena suites: what is measured, at which sizes and budgets. `quick` runs on a CPU, `full` on a GPU.

A suite is plain data; the runner turns it into cells (one training run or one measurement each).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class TaskSpec:
    """One quality task: a generator of `effarch.data.tasks` (or "lm" for bits-per-byte on text).

    The model trains at `train_len` and is scored at every length in `eval_lens` (growing context for
    induction heads and passkey). `sweep` marks the tasks whose learning rate is swept; the others reuse
    the best learning rate an architecture found on the first swept task.
    """

    name: str  # unique within a suite, used in cell ids
    kind: str  # "mqar", "selective_copying", "induction_heads", "passkey" or "lm"
    train_len: int
    vocab_size: int
    options: dict[str, Any] = field(default_factory=dict)  # generator keyword arguments
    eval_lens: tuple[int, ...] = ()  # empty: train_len only
    n_train: int = 4096
    n_test: int = 128
    batch_size: int = 32
    steps: int = 400
    sweep: bool = False
    # Every architecture trains exactly `steps` steps (a fixed token budget, as the LM comparison needs);
    # the run's time budget does not shorten it, only the suite's per-cell cap can.
    fixed_steps: bool = False

    @property
    def lengths(self) -> tuple[int, ...]:
        return self.eval_lens or (self.train_len,)


@dataclass(frozen=True)
class Suite:
    name: str
    device: str  # "cpu" or "cuda"
    quality_size: str  # preset size for the quality tasks (unless --arch names one)
    speed_size: str  # preset size for the speed and memory cells
    tasks: tuple[TaskSpec, ...]
    lrs: tuple[float, ...]  # the learning-rate sweep
    default_lr: float  # used when a sweep found nothing usable
    time_budget_s: float | None  # total wall-clock budget: sets each cell's time and step count (None: fixed steps)
    cell_time_cap_s: float  # no quality cell trains longer than this
    train_lens: tuple[int, ...]  # speed: training step at these sequence lengths
    train_tokens: int  # tokens per training step (batch = train_tokens // length, at least 1)
    infer_lens: tuple[int, ...]  # prefill latency and per-token decode latency at these contexts
    decode_tokens: int  # decode steps timed per context
    cache_lens: tuple[int, ...]  # analytic cache bytes at these contexts
    repeats: int  # timed repetitions per speed figure (median reported)
    eval_tokens: int  # tokens per evaluation batch (batch = eval_tokens // length)
    speed_time_cap_s: float  # a length whose single step takes longer ends that architecture's sweep
    lm_max_bytes: int  # corpus bytes read for the LM task
    quality_share: float = 0.8  # share of time_budget_s given to quality cells
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Suite:
        """Inverse of `to_dict` (JSON turns tuples into lists; they are turned back)."""
        d = dict(d)
        d["tasks"] = tuple(TaskSpec(**{**t, "eval_lens": tuple(t.get("eval_lens", ()))}) for t in d["tasks"])
        for k in ("lrs", "train_lens", "infer_lens", "cache_lens"):
            d[k] = tuple(d[k])
        return cls(**d)

    def task(self, name: str) -> TaskSpec:
        return next(t for t in self.tasks if t.name == name)


QUICK = Suite(
    name="quick",
    device="cpu",
    quality_size="debug",
    speed_size="debug",
    tasks=(
        TaskSpec("mqar-64x4", "mqar", 64, 256, {"num_pairs": 4}, sweep=True, batch_size=32, steps=1000),
        TaskSpec("selective_copying-64", "selective_copying", 64, 16, {"num_tokens": 4}, batch_size=32, steps=1000),
        TaskSpec(
            "induction_heads-64", "induction_heads", 64, 16, {}, eval_lens=(64, 128, 256), batch_size=32, steps=1000
        ),
        TaskSpec("passkey-64", "passkey", 64, 32, {"key_len": 3}, eval_lens=(64, 128, 256), batch_size=32, steps=1000),
        TaskSpec("lm-128", "lm", 128, 260, {}, n_test=64, batch_size=16, steps=100, fixed_steps=True),
    ),
    lrs=(3e-3, 1e-2),
    default_lr=3e-3,
    time_budget_s=600.0,
    cell_time_cap_s=60.0,
    train_lens=(256, 1024, 4096),
    train_tokens=4096,
    infer_lens=(256, 1024, 4096),
    decode_tokens=8,
    cache_lens=(256, 1024, 4096, 16384, 65536, 131072),
    repeats=2,
    eval_tokens=8192,
    speed_time_cap_s=10.0,
    lm_max_bytes=2_000_000,
)

# Every architecture trains the same steps on every task (fixed_steps), so the MQAR ordering compares
# models, not speeds; the per-cell cap only stops a pathological one. Batch sizes and data sizes are
# Zoology's (512 examples per step up to T = 128, 256 at T = 256; 100K train, 3K test); Zoology trains 64
# epochs, 1,000 steps here is about 5 (the report says so beside the literature check).
_MQAR_FULL = dict(n_train=100_000, n_test=3_000, steps=1000, sweep=True, fixed_steps=True)
_TASK_FULL = dict(n_train=25_600, n_test=500, batch_size=32, steps=800, fixed_steps=True)
# Induction heads and passkey supervise one answer per sequence: at 32 sequences per step every model of the
# first full run stayed at chance on induction heads (loss ln 13 for all 800 steps), while at T = 32 a small
# transformer learned the task in about 100 steps of 256 sequences. They train on 64K tokens per step, as MQAR.
_RECALL_FULL = dict(_TASK_FULL, n_train=102_400)

FULL = Suite(
    name="full",
    device="cuda",
    quality_size="small",
    speed_size="medium",
    tasks=(
        # Zoology's grid: V = 8192, (T, K) in {(64, 4), (128, 8), (256, 16)}.
        TaskSpec("mqar-64x4", "mqar", 64, 8192, {"num_pairs": 4}, batch_size=512, **_MQAR_FULL),
        TaskSpec("mqar-128x8", "mqar", 128, 8192, {"num_pairs": 8}, batch_size=512, **_MQAR_FULL),
        TaskSpec("mqar-256x16", "mqar", 256, 8192, {"num_pairs": 16}, batch_size=256, **_MQAR_FULL),
        TaskSpec("selective_copying-512", "selective_copying", 512, 16, {"num_tokens": 16}, **_TASK_FULL),
        TaskSpec(
            "induction_heads-256",
            "induction_heads",
            256,
            16,
            {},
            eval_lens=(256, 1024, 4096, 16384),
            **{**_RECALL_FULL, "batch_size": 256},
        ),
        TaskSpec(
            "passkey-512",
            "passkey",
            512,
            64,
            {"key_len": 5},
            eval_lens=(512, 1024, 2048, 4096, 8192),
            **{**_RECALL_FULL, "n_train": 51_200, "batch_size": 128},
        ),
        TaskSpec("lm-512", "lm", 512, 260, {}, n_test=64, batch_size=32, steps=1000, fixed_steps=True),
    ),
    lrs=(1e-3, 3e-3),
    default_lr=1e-3,
    time_budget_s=None,
    cell_time_cap_s=300.0,
    train_lens=(1024, 2048, 4096, 8192, 16384, 32768, 65536),
    train_tokens=65536,
    infer_lens=(1024, 4096, 16384, 65536),
    decode_tokens=32,
    cache_lens=(1024, 4096, 16384, 65536, 131072, 524288),
    repeats=3,
    eval_tokens=65536,
    speed_time_cap_s=20.0,
    lm_max_bytes=200_000_000,
)

SUITES = {"quick": QUICK, "full": FULL}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"--suite {name!r} is not one of {', '.join(SUITES)}")
    return SUITES[name]


__all__ = ["TaskSpec", "Suite", "QUICK", "FULL", "SUITES", "get_suite", "replace"]
