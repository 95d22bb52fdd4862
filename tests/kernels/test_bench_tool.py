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
    assert lines[-1] == "all ok" and len(lines) == 7


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_timing_without_cuda_is_one_clear_line():
    proc = subprocess.run([sys.executable, "tools/bench_kernels.py", "--op", "attention"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: timing needs a CUDA GPU (none visible); run with --check for correctness in the interpreter"]


def test_no_gpu_and_no_interpreter_is_refused(monkeypatch):
    from kernels.norms import rms_norm

    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="Triton kernels run on CUDA; on cpu set TRITON_INTERPRET=1"):
        rms_norm(torch.randn(2, 8), torch.ones(8))
