"""Trainer: checkpoint round trip, exact resume in-process and after a killed process, bad checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from effarch import build_model
from effarch.data.batches import StreamBatches
from effarch.models.presets import preset_config
from effarch.train import TrainConfig, latest_checkpoint, load_model, lr_at, train

TOKENS = torch.randint(0, 256, (20_000,), generator=torch.Generator().manual_seed(0))


def fresh_model():
    torch.manual_seed(0)
    return build_model(preset_config("transformer:debug"))


def cfg(tmp, **kw):
    base = dict(steps=12, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=3, progress=False, checkpoint_dir=str(tmp))
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule_warms_up_and_decays():
    c = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, c) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)


def test_checkpoint_round_trip(tmp_path):
    model = fresh_model()
    train(model, StreamBatches(TOKENS, 32), cfg(tmp_path, steps=3))
    loaded = load_model(tmp_path)
    ids = torch.randint(0, 256, (2, 16))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    assert loaded.lm_head.weight.data_ptr() == loaded.embed.weight.data_ptr()  # still tied


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    full = train(fresh_model(), StreamBatches(TOKENS, 32), cfg(tmp_path / "a"))
    # Interrupted: stop after 5 steps (checkpoint every 5), then resume in a new model object.
    part = cfg(tmp_path / "b", checkpoint_every=5)
    part.steps = 12
    model = fresh_model()
    part_cfg = TrainConfig(**{**part.__dict__, "max_time_s": 0.0})  # stops after the first step
    train(model, StreamBatches(TOKENS, 32), part_cfg)
    assert latest_checkpoint(tmp_path / "b") is not None
    resumed = train(fresh_model(), StreamBatches(TOKENS, 32), part)
    assert resumed.losses == full.losses


def test_killed_process_resumes_exactly(tmp_path):
    def args(steps, out):
        return [
            sys.executable,
            "-m",
            "effarch.cli",
            "train",
            "--model",
            "transformer:debug",
            "--steps",
            str(steps),
            "--batch-size",
            "4",
            "--seq-len",
            "32",
            "--checkpoint-every",
            "3",
            "--quiet",
            "--max-bytes",
            "300000",
            "--out",
            str(out),
        ]

    steps = 60  # the kill comes at the first checkpoint (step 3); the rest resumes
    ref = subprocess.run(args(steps, tmp_path / "ref"), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "run"
    proc = subprocess.Popen(args(steps, run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and latest_checkpoint(run) is None:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and int(ckpt.name.split("-")[1]) < steps, "the run finished before it could be killed"
    assert not (run / "metrics.json").exists()
    res = subprocess.run(args(steps, run), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    losses = json.loads((run / "metrics.json").read_text())["losses"]
    ref_losses = json.loads((tmp_path / "ref" / "metrics.json").read_text())["losses"]
    assert len(losses) == steps and losses == ref_losses
    assert not list(run.glob(".tmp-*")), "a temporary checkpoint folder was left behind"


def test_bad_checkpoints_give_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a checkpoint"):
        load_model(tmp_path / "empty")
    train(fresh_model(), StreamBatches(TOKENS, 32), cfg(tmp_path / "ok", steps=2))
    ck = latest_checkpoint(tmp_path / "ok")
    (ck / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        load_model(ck)


def test_bad_train_config():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1)
    with pytest.raises(ValueError, match="seq_len"):
        StreamBatches(TOKENS[:10], 32)
