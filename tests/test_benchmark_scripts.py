"""The GPU benchmark scripts run end to end on the CPU at the debug size (a smoke run of every code path short
of CUDA), write their figures as JSON, and leave benchmarks/RESULTS.md alone without --write."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
RESULTS = BENCH / "RESULTS.md"
PRESETS = ("transformer", "gated-deltanet")
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _run_script(name: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    before = _digest(RESULTS)
    r = subprocess.run(
        [sys.executable, str(BENCH / f"{name}.py"), "--size", "debug", "--device", "cpu",
         "--presets", ",".join(PRESETS), "--json", str(out), *args],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert _digest(RESULTS) == before, "RESULTS.md changed without --write"
    data = json.loads(out.read_text())
    assert data["device"] == "cpu" and data["size"] == "debug" and data["env"]["torch"]
    return data


def test_train_throughput_script(tmp_path):
    data = _run_script("train_throughput", tmp_path, "--shapes", "2x32,1x48", "--steps", "1", "--warmup", "1")
    models = [f"effarch {p}" for p in PRESETS] + (["transformers Llama (SDPA)"] if HAS_TRANSFORMERS else [])
    rows = {(r["model"], r["batch"], r["seq_len"]): r for r in data["rows"] if not r["model"].startswith("fla")}
    assert set(rows) == {(m, b, t) for m in models for b, t in ((2, 32), (1, 48))}
    for r in rows.values():
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and r["params"] > 0
        assert 0 < r["issue_ms"] <= r["step_ms"]  # the host's issue time is part of the step
        ph = r["phases"]  # one more step run phase by phase, synced apart
        names = ("forward", "backward", "optimizer")
        assert set(ph) == {f"{n}_{w}ms" for n in names for w in ("host_", "")}
        assert all(0 < ph[f"{n}_host_ms"] <= ph[f"{n}_ms"] for n in names)
        assert r["peak_mem_bytes"] is None  # CUDA memory only
        assert r["dtype"] == "float32"
    assert all(r["fused"] is False for r in rows.values() if r["model"].startswith("effarch"))


def test_train_throughput_with_separate_projections(tmp_path):
    """--separate-projections trains the mixers with their input projections as separate layers and --set changes
    a setting for the run; the rows say both."""
    data = _run_script(
        "train_throughput", tmp_path, "--presets", "gla,gated-deltanet", "--no-peers", "--separate-projections",
        "--shapes", "2x32", "--steps", "1", "--warmup", "1", "--set", "effarch.ops.fused.norm.FWD_TILE=4096",
    )  # fmt: skip
    tag = " (separate projections) [effarch.ops.fused.norm.FWD_TILE=4096]"
    assert [r["model"] for r in data["rows"]] == ["effarch gla" + tag, "effarch gated-deltanet" + tag]
    assert all(r["tokens_per_s"] > 0 for r in data["rows"])


def test_generate_throughput_script(tmp_path):
    data = _run_script(
        "generate_throughput", tmp_path,
        "--batches", "1,2", "--contexts", "8,20", "--prompt-len", "6", "--new-tokens", "3",
    )  # fmt: skip
    models = [f"effarch {p} (static cache)" for p in PRESETS]
    models += ["transformers Llama generate"] if HAS_TRANSFORMERS else []
    gen = {(r["model"], r["batch"]): r for r in data["generate"]}
    assert set(gen) == {(m, b) for m in models for b in (1, 2)}
    for r in gen.values():
        assert r["tokens_per_s"] > 0 and r["new_tokens"] == 3 and r["prompt_len"] == 6
    dec = {(r["model"], r["batch"], r["context"]): r for r in data["decode"]}
    assert set(dec) == {(p, b, c) for p in PRESETS for b in (1, 2) for c in (8, 20)}
    for r in dec.values():
        assert r["ms"] > 0 and r["cache_bytes"] > 0


BAD_OPTIONS = [
    ("train_throughput", ["--size", "debug", "--shapes", "2by64"], "--shapes '2by64' must be"),
    ("train_throughput", ["--size", "debug", "--peers", "banana"], "--peers 'banana': expected some of llama"),
    ("train_throughput", ["--size", "debug", "--set", "effarch.ops.fused.norm.NOPE=1"], "for an existing setting"),
    ("train_throughput", ["--size", "debug", "--set", "effarch.ops.fused.norm.FWD_TILE=x y"], "a Python literal"),
    ("train_throughput", ["--size", "debug", "--set", "os.sep=1"], "give effarch.MODULE.NAME=VALUE"),
    ("train_throughput", ["--size", "debug", "--device", "cpu", "--cuda-graph"], "--cuda-graph needs a CUDA"),
    ("generate_throughput", ["--size", "debug", "--batches", "0"], "--batches '0' must be"),
    ("scan_ops", ["--T", "64,x"], "must be comma-separated integers"),
    ("ttt_prefill", ["--shapes", "1x40,banana"], "list of BATCHxTOKENS (positive"),
    ("conv_ops", ["--shapes", "2x40"], "list of BATCHxTOKENSxCHANNELS"),
    ("conv_ops", ["--tiles", "64x48"], "powers of two from 16 to 256"),
    ("conv_ops", ["--dz", "32x64"], "each is TOKENSxCHANNELSxWARPS"),
    ("conv_ops", ["--dz", "32x64x3"], "warps 1, 2, 4, 8 or 16"),
    ("ce_ops", ["--shapes", "64x16"], "list of TOKENSxDIMxVOCAB"),
    ("ce_ops", ["--chunk", "0"], "give a positive number of tokens"),
]

# Runs each script as `python script.py ARGS` would, one after another in one process (an interpreter and torch
# import per case took 50 s): what it writes to stderr, with a SystemExit's message printed as Python prints it, and
# its exit status; any other exception is reported with its traceback.
_DRIVER = """
import contextlib, io, json, runpy, sys, traceback
bench, cases = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, bench)
out = []
for script, args in cases:
    err = io.StringIO()
    code = 0
    sys.argv = [f"{bench}/{script}.py", *args]
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            runpy.run_path(f"{bench}/{script}.py", run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
            if e.code is not None and not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
        except BaseException:
            code = 1
            traceback.print_exc()
    out.append([code, err.getvalue()])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def bad_option_runs(tmp_path_factory):
    cases = [[script, ["--device", "cpu", *args]] for script, args, _ in BAD_OPTIONS]
    r = subprocess.run(
        [sys.executable, "-c", _DRIVER, str(BENCH), json.dumps(cases)],
        cwd=tmp_path_factory.mktemp("bad"), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", range(len(BAD_OPTIONS)), ids=lambda i: f"{BAD_OPTIONS[i][0]}-{i}")
def test_bad_options(bad_option_runs, case):
    """One sentence on stderr, no traceback."""
    code, stderr = bad_option_runs[case]
    assert code != 0 and BAD_OPTIONS[case][2] in stderr and "Traceback" not in stderr, stderr[-2000:]


def test_arena_step_script(tmp_path):
    out = tmp_path / "arena_step.json"
    before = _digest(RESULTS)
    r = subprocess.run(
        [sys.executable, str(BENCH / "arena_step.py"), "--archs", ",".join(PRESETS), "--size", "debug",
         "--device", "cpu", "--steps", "3", "--batch", "2", "--length", "32", "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert _digest(RESULTS) == before
    rows = json.loads(out.read_text())["rows"]
    assert [(x["arch"], x["cuda_graph"]) for x in rows] == [(p, g) for p in PRESETS for g in (False, True)]
    for eager, graphed in zip(rows[::2], rows[1::2]):
        assert eager["ms_per_step"] > 0 and graphed["ms_per_step"] > 0
        assert eager["last_loss"] == graphed["last_loss"]  # on the CPU the flag changes nothing


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message shown without a GPU")
def test_arena_step_breakdown_says_it_needs_a_gpu(tmp_path):
    r = subprocess.run(
        [sys.executable, str(BENCH / "arena_step.py"), "--breakdown", "--archs", PRESETS[0], "--size", "debug"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode != 0 and "needs a CUDA GPU" in r.stderr and "Traceback" not in r.stderr


def test_scan_ops_script(tmp_path):
    out = tmp_path / "scan_ops.json"
    before = _digest(RESULTS)
    r = subprocess.run(
        [sys.executable, str(BENCH / "scan_ops.py"), "--device", "cpu", "--T", "32,64", "--D", "32", "--N", "4",
         "--tokens", "128", "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert _digest(RESULTS) == before
    data = json.loads(out.read_text())
    assert data["check"] and all(row.endswith("| ok |") for row in data["check"])
    ops = {(x["op"].split(",")[0], x["T"]) for x in data["rows"]}
    assert ops == {(op, T) for op in ("selective scan", "chunked linear recurrence") for T in (32, 64)}
    assert all(x["fwd_ms"] > 0 and x["fwd_bwd_ms"] > 0 for x in data["rows"])


def test_profile_step_script(tmp_path):
    out = tmp_path / "profile.json"
    r = subprocess.run(
        [sys.executable, str(BENCH / "profile_step.py"), "--preset", "gated-deltanet", "--size", "debug",
         "--batch", "2", "--seq-len", "32", "--steps", "1", "--top", "5", "--device", "cpu", "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert 0 < len(data["top"]) <= 5 and data["summary"]["step_ms"] > 0
    assert all(0 < row["share"] <= 1 for row in data["top"])
    bad = subprocess.run(
        [sys.executable, str(BENCH / "profile_step.py"), "--preset", "no-such-preset", "--size", "debug",
         "--device", "cpu"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode != 0 and "no-such-preset" in bad.stderr and "Traceback" not in bad.stderr


def test_ttt_prefill_script(tmp_path):
    """Both paths at a small shape under the interpreter: the kernel's output equals the loop's."""
    out = tmp_path / "ttt.json"
    r = subprocess.run(
        [sys.executable, str(BENCH / "ttt_prefill.py"), "--device", "cpu", "--shapes", "1x40,2x16", "--d-model", "64",
         "--heads", "2", "--repeat", "1", "--json", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(x["batch"], x["tokens"]) for x in rows] == [(1, 40), (2, 16)]
    assert all(x["kernel_calls"] > 0 and x["loop_ms"] > 0 and x["kernel_ms"] > 0 and x["rel_diff"] < 1e-5 for x in rows)


def test_ce_ops_script(tmp_path):
    """Every form of the head's loss at a small shape (the Triton rows under the interpreter) matches the float32
    full-logits reference; nothing is written to RESULTS.md without a GPU even with --write."""
    out = tmp_path / "ce.json"
    before = _digest(RESULTS)
    r = subprocess.run(
        [sys.executable, str(BENCH / "ce_ops.py"), "--device", "cpu", "--shapes", "40x16x100", "--chunk", "16",
         "--json", str(out), "--write"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert _digest(RESULTS) == before
    rows = json.loads(out.read_text())["rows"]
    assert [x["form"] for x in rows] == ["full logits (F.cross_entropy)", "chunked, PyTorch", "chunked, Triton rows"]
    assert all(x["max_rel_err"] < 1e-5 and x["fwdbwd_ms"] > 0 for x in rows)


def test_conv_ops_script(tmp_path):
    """Every path at a small shape under the interpreter: the kernels' output and gradients equal the PyTorch form's,
    and nothing is written to RESULTS.md without a GPU even with --write."""
    out = tmp_path / "conv.json"
    before = _digest(RESULTS)
    r = subprocess.run(
        [sys.executable, str(BENCH / "conv_ops.py"), "--device", "cpu", "--shapes", "2x40x24,1x70x8", "--json", str(out),
         "--write", "--tiles", "64x64,16x32", "--dz", "16x16x1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert _digest(RESULTS) == before
    rows = json.loads(out.read_text())["rows"]
    dz = "64x64, dz 16x16 1 warps"
    assert [(x["B"], x["T"], x["C"], x["tile"]) for x in rows] == [
        (2, 40, 24, "64x64"), (2, 40, 24, "16x32"), (2, 40, 24, dz), (1, 70, 8, "64x64"), (1, 70, 8, "16x32"),
        (1, 70, 8, dz),
    ]  # fmt: skip
    assert all(x["triton_err"] < 1e-5 and x["triton_fwd_ms"] > 0 and x["triton_fwdbwd_ms"] > 0 for x in rows)


def test_linear_ops_kernel_variants_parse_and_apply(monkeypatch):
    """`linear_ops.py --try`: every combination of the named launch settings, applied in turn; a name that is
    not a launch setting is refused with the form expected."""
    monkeypatch.syspath_prepend(str(BENCH))
    import linear_ops

    from effarch.ops.linear.triton import launch

    monkeypatch.setattr(linear_ops, "SHIPPED", {})
    monkeypatch.setattr(launch, "SAVE_STATES", launch.SAVE_STATES)
    variants = linear_ops.parse_variants("STATE_PASS=fused,two_phase; GLA_INTRA_BWD_BK=0,32")
    assert variants == [{}] + [
        {"STATE_PASS": s, "GLA_INTRA_BWD_BK": b} for s in ("fused", "two_phase") for b in (0, 32)
    ]
    assert linear_ops.parse_variants("") == [{}]
    assert linear_ops.parse_variants("SAVE_STATES=false,True") == [{}, {"SAVE_STATES": False}, {"SAVE_STATES": True}]
    monkeypatch.setattr(launch, "STATE_PASS", launch.STATE_PASS)
    monkeypatch.setattr(launch, "GLA_INTRA_BWD_BK", launch.GLA_INTRA_BWD_BK)
    assert linear_ops.use_variant(variants[4]) == "ours [STATE_PASS=two_phase GLA_INTRA_BWD_BK=32]"
    assert (launch.STATE_PASS, launch.GLA_INTRA_BWD_BK) == ("two_phase", 32)
    assert linear_ops.use_variant({}) == "ours"
    for bad in ("NOT_A_SETTING=1", "STATE_PASS", "triton=1", "STATE_PASS=fused|NOPE=2"):
        with pytest.raises(ValueError, match="NAME=v1,v2"):
            linear_ops.parse_variants(bad)


def test_linear_ops_variant_groups_sweep_one_at_a_time(monkeypatch):
    """`--try "A=..|B=.."`: A's values with B as shipped, then B's with A as shipped (restored, not left over)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import linear_ops

    from effarch.ops.linear.triton import backward, launch

    monkeypatch.setattr(linear_ops, "SHIPPED", {})
    monkeypatch.setattr(launch, "STATE_FWD_WARPS", 4)
    monkeypatch.setattr(backward, "DQK_WARPS", 8)
    variants = linear_ops.parse_variants("STATE_FWD_WARPS=2,8 | DQK_WARPS=4")
    assert variants == [{}, {"STATE_FWD_WARPS": 2}, {"STATE_FWD_WARPS": 8}, {"DQK_WARPS": 4}]
    assert linear_ops.use_variant(variants[2]) == "ours [STATE_FWD_WARPS=8]"
    assert linear_ops.use_variant(variants[3]) == "ours [DQK_WARPS=4]"
    assert (launch.STATE_FWD_WARPS, backward.DQK_WARPS) == (4, 4)
    assert linear_ops.use_variant({}) == "ours" and (launch.STATE_FWD_WARPS, backward.DQK_WARPS) == (4, 8)


def test_linear_ops_lengths_parse(monkeypatch, capsys):
    """`--T` / `--profile-T`: comma lists of multiples of 64; anything else is one usage sentence, not a traceback."""
    monkeypatch.syspath_prepend(str(BENCH))
    import argparse

    import linear_ops

    ap = argparse.ArgumentParser(prog="linear_ops.py")
    assert linear_ops._lengths("8192, 32768", ap) == [8192, 32768]
    for bad in ("8192,x", "100", "", "-64"):
        with pytest.raises(SystemExit):
            linear_ops._lengths(bad, ap)
        assert "give a comma list of positive multiples of 64" in capsys.readouterr().err
