import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def test_check_mode_runs_every_op_against_the_reference():
    proc = subprocess.run([sys.executable, "tools/bench_kernels.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    # attention (and with documents), 2 norms, rotary, cross-entropy, 2 swiglu, adamw
    assert lines[-1] == "all ok" and len(lines) == 10


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_timing_without_cuda_is_one_clear_line():
    proc = subprocess.run([sys.executable, "tools/bench_kernels.py", "--op", "attention"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: timing needs a CUDA GPU (none visible); run with --check for correctness in the interpreter"]


def test_check_without_triton_is_one_line_naming_the_extra():
    code = ("import runpy, sys; sys.modules['triton'] = None; sys.argv = ['tools/bench_kernels.py', '--check']; "
            "runpy.run_path('tools/bench_kernels.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == ["error: the Triton kernels need triton: pip install -e '.[triton]'"]


def test_no_gpu_and_no_interpreter_is_refused(monkeypatch):
    from pretrain.kernels.norms import rms_norm

    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="Triton kernels run on CUDA; on cpu set TRITON_INTERPRET=1"):
        rms_norm(torch.randn(2, 8), torch.ones(8))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU path (compile-only launches)")
def test_cross_entropy_memory_counts_the_logits_the_fused_op_never_makes():
    env = {k: v for k, v in __import__("os").environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "tools/bench_kernels.py", "--ce-memory", "512", "256", "32000",
                           "--dtype", "fp32"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fused, unfused = (float(x) for x in re.findall(r"(?:fused|unfused) ([0-9.]+)", proc.stdout))
    logits_mib = 512 * 32000 * 4 / 2 ** 20
    # unfused: the fp32 logits, their log-softmax and their gradient are alive at once
    assert unfused >= 3 * logits_mib - 0.1
    # fused: the weight gradient (and its scaled copy) and one (N, 1024) chunk, never (N, V)
    weight_mib = 32000 * 256 * 4 / 2 ** 20
    assert fused < 2 * weight_mib + logits_mib / 4
