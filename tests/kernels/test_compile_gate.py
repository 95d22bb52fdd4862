"""The compile gate (kernels/compile_check.py via tools/compile_kernels.py): real cubins for sm_80, sm_90a and
sm_100a, made on this CPU machine. It must pass on the project's kernels and must catch planted defects."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
TOOL = [sys.executable, str(ROOT / "tools" / "compile_kernels.py")]


def gate(*args, tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([*TOOL, *args, "--json", str(out)], capture_output=True, text=True, cwd=ROOT,
                          timeout=900)
    rows = json.loads(out.read_text()) if out.exists() else []
    return proc, rows


def test_gate_catches_a_plain_global_and_over_limit_shared_memory(tmp_path):
    proc, rows = gate("--arch", "sm_80", "--cases", str(Path(__file__).with_name("planted_kernels.py")),
                      tmp_path=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    problems = {row["families"][0]: " ".join(row["problems"]) for row in rows}
    assert "PLAIN_NEG" in problems["bf16/planted plain global"], problems
    assert "compile error" in problems["bf16/planted plain global"]
    assert "over the 166912 B limit of sm_80" in problems["bf16/planted big tiles"], problems
    assert "FAIL" in proc.stdout


def test_gate_refuses_bad_arguments(tmp_path):
    proc, _ = gate("--arch", "sm_70", tmp_path=tmp_path)
    assert proc.returncode == 2 and "unknown arch sm_70" in proc.stderr


# the pinned triton, and the GPU image's (tools/compile_kernels.py --triton installs it into a cache once)
@pytest.mark.slow
@pytest.mark.parametrize("triton_version", [None, "3.6.0"], ids=["pinned", "triton-3.6.0"])
def test_every_kernel_compiles_fits_and_uses_tensor_cores_on_every_arch(tmp_path, triton_version):
    proc, rows = gate(*(["--triton", triton_version] if triton_version else []), tmp_path=tmp_path)
    failed = [(r["arch"], r["kernel"], r["config"], r["problems"]) for r in rows if r["problems"]]
    assert proc.returncode == 0 and not failed, (failed, proc.stderr[-2000:])
    kernels = {(r["arch"], r["kernel"].lstrip("_"), r["dtype"]) for r in rows}
    for arch in ("sm_80", "sm_90a", "sm_100a"):
        for name in ("attn_fwd_kernel", "attn_bwd_dkdv_kernel", "attn_bwd_dq_kernel", "attn_bwd_delta_kernel",
                     "norm_fwd_kernel", "norm_bwd_kernel", "rotary_kernel", "ce_stats_kernel", "ce_grad_kernel",
                     "adamw_multi_kernel"):
            for dtype in ("bf16", "fp16"):
                assert (arch, name, dtype) in kernels, (arch, name, dtype)
    attention = [r for r in rows if r["kernel"].startswith("_attn") and r["matmul"]]
    assert attention and all(r["smem"] <= r["smem_limit"] and r["spill_bytes"] == 0 for r in attention)
    assert all("HMMA" in r["mma"] for r in attention if r["arch"] == "sm_80")
    # query/key head dims up to 128 take warpgroup MMA on sm_90a; 256-wide ones (E256, MLA's E192) may take mma.sync
    hopper_128 = [r for r in attention if r["arch"] == "sm_90a"
                  and not any(wide in " ".join(r["families"]) for wide in ("E256", "E192"))]
    assert hopper_128 and all("HGMMA" in r["mma"] for r in hopper_128)


def test_the_gate_cache_key_follows_every_input(tmp_path):
    """A cached gate result is reused only for the same kernel sources, cases, triton and arguments."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("compile_kernels", ROOT / "tools" / "compile_kernels.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    cases = tmp_path / "cases.py"
    cases.write_text("CASES = []\n")
    key = tool.cache_key(["sm_80"], False, None, str(cases), None)
    assert key == tool.cache_key(["sm_80"], False, None, str(cases), None)
    assert key != tool.cache_key(["sm_90a"], False, None, str(cases), None)
    assert key != tool.cache_key(["sm_80"], True, None, str(cases), None)
    assert key != tool.cache_key(["sm_80"], False, None, str(cases), tmp_path / "triton-3.6.0")
    cases.write_text("CASES = []  # changed\n")
    assert key != tool.cache_key(["sm_80"], False, None, str(cases), None)
