"""The benchmark and GPU scripts still run end to end (smoke sizes; their own checks, no timings)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))


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


@pytest.mark.slow
def test_scoring_scale_benchmark_runs_the_asset_path_and_agrees(tmp_path):
    out = _run(
        "benchmarks/bench_scoring_scale.py",
        "--sizes",
        "20000",
        "40000",
        "--shard-size",
        "10000",
        "--repeats",
        "1",
        "--dir",
        str(tmp_path),
    )
    assert "check: every target's selection (size and top 5 ids) equals the plain computation's" in out
    assert "asset path (select_job)" in out


@pytest.mark.slow
def test_shared_pass_benchmark_quick_gives_the_same_bytes_both_ways(tmp_path):
    out = _run("benchmarks/bench_shared_pass.py", "--quick", "--repeats", "1", "--dir", str(tmp_path))
    assert "outputs of the two variants identical, byte for byte: True" in out
    assert "two passes / one pass" in out


@pytest.mark.slow
def test_sketch_benchmark_quick_runs_through_the_evaluation():
    out = _run(
        "benchmarks/bench_sketch.py", "--quick", "--dim", "1024", "--curve", "256,1024", "--seeds", "1", timeout=600
    )
    assert "Agreement of gist_sketch with exact gist" in out and "Held-out loss after fine-tuning" in out
    assert "sketch - exact (per seed)" in out


@pytest.mark.slow
def test_gpu_script_loads_a_saved_model_and_reports_mfu(tmp_path, capsys):
    """In this process (the command line itself is the smoke test's): a saved model, the MFU arithmetic."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from gpu_feature_pass import main

    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    assert main(["--device", "cpu", "--tiny", "--model", str(tmp_path / "tiny"), "--peak-tflops", "1"]) == 0
    out = capsys.readouterr().out
    assert f"model {tmp_path / 'tiny'}" in out and "vocab 300" in out
    check = [line for line in out.splitlines() if line.startswith("check:")][0]
    assert float(check.split("relative max error ")[1].split()[0]) < 1e-4
    row = [line for line in out.splitlines() if line.startswith("| feature k=16 ")][0]
    cells = [c.strip() for c in row.strip("|").split("|")]
    tokens_per_s, mfu = float(cells[3].replace(",", "")), float(cells[4].rstrip("%")) / 100
    # MFU 6N against a 1 TFLOP/s peak, from the model's own matmul parameter count.
    n_flop = int(out.split(" in the per-token matmuls")[0].rsplit("(", 1)[1].replace(",", ""))
    assert n_flop == sum(p.numel() for p in LlamaForCausalLM(cfg).parameters()) - 300 * 32
    assert abs(mfu - 6 * n_flop * tokens_per_s / 1e12) < 1.5e-3
    assert "train step, completion logits" in out


def test_peak_lookup_prefers_the_specific_name():
    from gpu_feature_pass import peak_tflops

    assert peak_tflops("NVIDIA H200") == 989.0 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA L40S") == 362.0 and peak_tflops("NVIDIA L4") == 121.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0 and peak_tflops("Some CPU") is None
