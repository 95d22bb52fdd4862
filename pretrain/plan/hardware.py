"""The GPUs the planner knows: dense peak TFLOP/s by precision, HBM, and the bandwidths its communication terms
use (vendor datasheets; per GPU, one direction). Overridable from TOML: ``[plan.gpu.<name>]`` with these keys."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class GPU:
    name: str
    bf16_tflops: float  # dense tensor-core peak
    fp8_tflops: float  # dense; equal to bf16 where the GPU has no FP8 tensor cores
    hbm_gib: float
    hbm_tb_s: float
    nvlink_gb_s: float  # per GPU, one direction, inside the NVLink domain
    network_gb_s: float  # per GPU, one direction, between NVLink domains (InfiniBand / RoCE)
    gpus_per_node: int = 8  # the NVLink domain (72 on GB200 / GB300 NVL72)
    gemm_bf16_tflops: float = 0.0  # what a large dense bf16 GEMM reaches (cuBLAS, 8192³); 0: 0.8 × peak
    gemm_fp8_tflops: float = 0.0  # the same in FP8; 0: 0.8 × peak

    @property
    def gemm_bf16(self) -> float:
        return self.gemm_bf16_tflops or 0.8 * self.bf16_tflops

    @property
    def gemm_fp8(self) -> float:
        return self.gemm_fp8_tflops or 0.8 * self.fp8_tflops


# GEMM columns: large square GEMMs as commonly measured (A100 ~ 0.9 of peak; Hopper / Blackwell power-limited
# near 0.8, e.g. 788 TFLOP/s bf16 measured on an H200 at 8192³)
GPUS = {g.name: g for g in (
    GPU("a100_40gb", 312, 312, 40, 1.555, 300, 12.5, gemm_bf16_tflops=280, gemm_fp8_tflops=280),
    GPU("a100_80gb", 312, 312, 80, 2.039, 300, 25, gemm_bf16_tflops=280, gemm_fp8_tflops=280),
    GPU("h100", 989, 1979, 80, 3.35, 450, 50, gemm_bf16_tflops=780, gemm_fp8_tflops=1450),
    GPU("h200", 989, 1979, 141, 4.8, 450, 50, gemm_bf16_tflops=788, gemm_fp8_tflops=1450),
    GPU("b200", 2250, 4500, 180, 8.0, 900, 50, gemm_bf16_tflops=1700, gemm_fp8_tflops=3300),
    GPU("gb200", 2500, 5000, 186, 8.0, 900, 50, 72, gemm_bf16_tflops=1900, gemm_fp8_tflops=3700),
    GPU("gb300", 2500, 5000, 279, 8.0, 900, 100, 72, gemm_bf16_tflops=1900, gemm_fp8_tflops=3700),
)}

_ALIASES = ((r"gb300", "gb300"), (r"gb200", "gb200"), (r"b200", "b200"), (r"h200", "h200"), (r"h100", "h100"),
            (r"a100.*40", "a100_40gb"), (r"a100", "a100_80gb"))


def gpu(name: str, overrides: dict | None = None) -> GPU:
    """The table's GPU for a name as users and published tables write it ("h100", "H100 (DGX-H100)",
    "a100_40gb"), with ``overrides`` (a TOML table of GPU fields) applied; ValueError names the known ones."""
    key = name.strip().lower()
    found = GPUS.get(key) or next((GPUS[g] for pattern, g in _ALIASES if re.search(pattern, key)), None)
    if found is None:
        raise ValueError(f"unknown GPU {name!r}: known are {', '.join(GPUS)} (or describe it under [plan.gpu.NAME])")
    if overrides:
        known = {f.name for f in fields(GPU)} - {"name"}
        bad = set(overrides) - known
        if bad:
            raise ValueError(f"unknown GPU field(s) {', '.join(sorted(bad))}: known are {', '.join(sorted(known))}")
        found = replace(found, **overrides)
    return found


@dataclass(frozen=True)
class MeterConstants:
    """How the step-cost meter (``step_cost.py``) reads counted work as GPU time — a roofline, not a fit: the
    first GPU run (``tools/gpu_check.sh``: predicted beside measured step) calibrates them."""

    width_half: float = 510.0  # matmul width (d_model / tp) at which a GEMM reaches half the large-GEMM rate
    attention_efficiency: float = 0.5  # fused attention's executed FLOPs at this share of the large-GEMM rate
    hbm_efficiency: float = 0.8  # streaming kernels reach this share of the HBM datasheet bandwidth
    launch_us: float = 2.0  # the GPU idles this long between two kernels of an eager step


METER = MeterConstants()
