"""The benchmark and GPU scripts still run end to end (smoke sizes; their own checks, no timings)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(*args: str, timeout: int = 300) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_gpu_script_cpu_smoke_matches_reference():
    out = _run("scripts/gpu_feature_pass.py", "--device", "cpu", "--tiny")
    check = [line for line in out.splitlines() if line.startswith("check:")][0]
    error = float(check.split("relative max error ")[1].split()[0])
    assert error < 1e-4 and "completion positions only" in check
    assert "gradient checkpointing: time / without" in out


@pytest.mark.slow
def test_basis_memory_benchmark_quick_bases_agree():
    out = _run("benchmarks/bench_basis_memory.py", "--quick")
    assert "OK: the bases agree" in out and "bounded peak RSS - budget" in out
