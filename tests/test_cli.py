"""The `effarch` command: each subcommand works, and every user mistake is one sentence with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from effarch.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_groups_by_family(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    assert "full/grouped" in out and "attn" in out and "transformer" in out


def test_info_reports_parameters_and_cache(capsys):
    code, out, _ = run(capsys, "info", "transformer-gqa:small")
    assert code == 0
    assert "parameters" in out and "per token" in out
    # 4 layers x 2 (k, v) x 2 kv heads x 32 dims x 2 bytes = 1 KiB per token
    assert "1.0 KiB per token" in out


def test_train_then_generate(capsys, tmp_path):
    code, out, err = run(
        capsys,
        "train",
        "--model",
        "transformer:debug",
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--out",
        str(tmp_path / "r"),
        "--quiet",
        "--max-bytes",
        "200000",
    )
    assert code == 0, err
    assert "val bpb" in out and (tmp_path / "r" / "metrics.json").exists()
    code, out, err = run(
        capsys,
        "generate",
        "--checkpoint",
        str(tmp_path / "r"),
        "--prompt",
        "def f",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
    )
    assert code == 0, err
    assert out.startswith("def f")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "no-such-model"], "neither a config file nor a preset"),
        (["info", "transformer:huge"], "preset size 'huge'"),
        (["train", "--model", "transformer:debug", "--data", "/nonexistent/x.txt", "--steps", "1"], "does not exist"),
        (["train", "--model", "transformer:debug", "--steps", "0"], "steps=0"),
        (["generate", "--model", "transformer:debug", "--checkpoint", "x"], "exactly one of"),
        (["generate", "--checkpoint", "/nonexistent/run"], "does not exist"),
        (["generate", "--model", "transformer:debug", "--top-p", "2"], "top_p"),
        (["generate", "--model", "transformer:debug", "--prefill-chunk", "0"], "chunk_size=0"),
    ],
)
def test_bad_input_is_one_clear_sentence(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_data_file_leaves_no_output(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    out = tmp_path / "run"
    code, _, err = run(
        capsys,
        "train",
        "--model",
        "transformer:debug",
        "--data",
        str(tmp_path / "empty.txt"),
        "--out",
        str(out),
        "--steps",
        "2",
    )
    assert code == 2 and "is empty" in err
    assert not (out / "metrics.json").exists() and not list(out.glob("step-*"))


def test_cli_process_has_no_traceback(tmp_path):
    (tmp_path / "bad.json").write_text("{")
    p = subprocess.run(
        [sys.executable, "-m", "effarch.cli", "info", str(tmp_path / "bad.json")], capture_output=True, text=True
    )
    assert p.returncode == 2
    assert "not valid JSON" in p.stderr and "Traceback" not in p.stderr


def test_bench_train_and_generate_report_a_line(capsys):
    code, out, err = run(capsys, "bench", "train", "--model", "transformer:debug", "--seq-len", "32", "--steps", "1")
    assert code == 0, err
    assert "tokens/s" in out and "train 4 x 32" in out and "the host issues it in" in out
    code, out, err = run(
        capsys, "bench", "generate", "--model", "mamba2:debug", "--prompt-len", "8", "--new-tokens", "4"
    )
    assert code == 0, err
    assert "new tokens/s" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "train", "--model", "nope"], "neither a config file nor a preset"),
        (["bench", "train", "--model", "transformer:debug", "--steps", "0"], "steps=0"),
        (["bench", "generate", "--model", "transformer:debug", "--device", "cpu", "--cuda-graph"], "CUDA"),
        (["bench", "train", "--model", "transformer:debug", "--device", "cpu", "--cuda-graph"], "CUDA"),
    ],
)
def test_bench_bad_input(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_output_into_a_closed_pipe_is_quiet():
    p = subprocess.run(f"{sys.executable} -m effarch.cli list | head -1", shell=True, capture_output=True, text=True)
    assert p.returncode == 0 and "Traceback" not in p.stderr and len(p.stdout.splitlines()) == 1
