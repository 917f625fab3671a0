"""Shared by the Triton kernel tests: run kernels under the Triton interpreter when there is no GPU.

Triton chooses the interpreter when a kernel is defined, so this module must be imported before the kernel
modules. When something imported Triton earlier in the process without the interpreter, the tests of that
file run again in a fresh process (`run_file_in_fresh_process`) and are skipped in this one.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
FRESH_PROCESS = not CUDA and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
_BEFORE = os.environ.get("TRITON_INTERPRET")
if not CUDA and not FRESH_PROCESS:
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True, scope="module")
def restore_environment():
    # On again for each file: an earlier file's teardown restored the environment it found.
    if not CUDA and not FRESH_PROCESS:
        os.environ["TRITON_INTERPRET"] = "1"
    yield
    if _BEFORE is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _BEFORE


@pytest.fixture(autouse=True)
def fresh_process_only(request):
    if FRESH_PROCESS and request.node.name != "test_in_fresh_process":
        pytest.skip("Triton was imported without the interpreter; test_in_fresh_process runs these")


def run_file_in_fresh_process(path: str, timeout: int = 900) -> None:
    """Run one test file under the interpreter in a new process; no-op when this process already is one."""
    if not FRESH_PROCESS:
        return
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", path],
        env=env, cwd=os.path.dirname(path), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
