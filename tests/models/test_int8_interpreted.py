"""The fused LLM.int8() Triton kernels on the CPU: tests/models/int8_interpreted_cases.py in a
child process with ``TRITON_INTERPRET=1`` (Triton reads it once, at import)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

CASES = ROOT / "tests" / "models" / "int8_interpreted_cases.py"


def run_cases(marks: str) -> str:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marks, str(CASES)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_fused_kernels_in_the_triton_interpreter():
    summary = run_cases("not slow and not gpu")  # float64 re-derivation, long rows, edge cases
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary


@pytest.mark.slow
def test_fused_kernels_compiled_and_in_bert_in_the_triton_interpreter():
    summary = run_cases("slow")  # one compiled graph over changing outliers; BERT with fused QKV
    assert " passed" in summary and "skipped" not in summary and "failed" not in summary, summary
