"""The compile gate: every Triton kernel compiled for real NVIDIA targets on a machine without a GPU.

The interpreter checks numbers, not GPUs: it runs code that no target compiles (non-constexpr globals) and tiles
that no target fits. Here a compile-only driver stands in for CUDA: its target is the chosen arch (sm_80 A100,
sm_90a H100/H200, sm_100a B200), every launch becomes a compile (``warmup``), every autotuned kernel compiles
each candidate its prune rule keeps for that target, and the cache starts empty (a warm one skips the front end
and hides its errors). The kernels are reached through the project's own host functions and autograd Functions,
with CPU tensors whose shapes give the same compile-time specialisation as the families named in ``cases``.
triton's own ``ptxas`` makes the cubin; its ``cuobjdump`` reads the registers, the stack (spills) and the SASS.

A compiled kernel fails the gate on: a compile error, any spill (stack frame or local memory), shared memory
over the arch's per-block limit, or — for a kernel with a ``tt.dot`` — no tensor-core instruction of the
arch's family (HMMA on sm_80, HGMMA on sm_90a, tcgen05 ``UTC*MMA`` or HMMA on sm_100a).

    python -m pretrain.kernels.compile_check --arch sm_90a --json out.json   # in this process (--shard I/N: a part)
    python tools/compile_kernels.py                                 # every arch, in parallel, with the table
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ARCHS = {"sm_80": 80, "sm_90a": 90, "sm_100a": 100}
SMEM_LIMIT = {80: 166_912, 90: 232_448, 100: 232_448}  # bytes of shared memory one block may use
TENSOR_CORE = ("HMMA", "HGMMA", "UTCHMMA", "UTCQMMA", "UTCOMMA", "UTCMMA")
# the instruction family each arch's matmul kernels must use; sm_90a accepts HMMA (mma.sync) only for 256-wide
# head dims, whose dK/dV accumulators cannot sit in registers at the 64-row tiles warpgroup MMA needs
MMA_FAMILY = {80: ("HMMA",), 90: ("HGMMA",), 100: ("UTCHMMA", "UTCQMMA", "UTCOMMA", "UTCMMA", "HMMA")}
DTYPES = ("bf16", "fp16")


@dataclass
class Row:
    arch: str
    kernel: str
    config: str
    dtype: str
    families: list[str] = field(default_factory=list)
    regs: int = 0
    spill_bytes: int = 0
    smem: int = 0
    smem_limit: int = 0
    mma: str = ""
    matmul: bool = False
    problems: list[str] = field(default_factory=list)


class CompileOnlyDriver:
    """A triton driver whose device is ``arch`` and whose launches never run. Only what compiling touches."""

    compile_only = True

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    @staticmethod
    def is_active():
        return False

    def get_current_target(self):
        return self.target

    def get_current_device(self):  # one device per arch: triton keeps a kernel cache per device
        return self.target.arch

    def get_current_stream(self, device=None):
        return 0

    def set_current_device(self, device):
        pass

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty):
        return ty

    def get_benchmarker(self):
        raise RuntimeError("the compile-only driver cannot time kernels")

    def get_device_interface(self):
        raise RuntimeError("the compile-only driver has no device")

    def get_empty_cache_for_benchmark(self):
        raise RuntimeError("the compile-only driver has no device")

    def clear_cache(self, cache):
        pass


class Recorder:
    """Patches triton so that launches compile only, and keeps every compiled kernel with the case it came from."""

    def __init__(self):
        self.label = ""
        self.arch = ""
        self.compiled: list[tuple] = []  # (arch name, case label, kernel name, CompiledKernel, meta)

    def install(self):
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        recorder, jit_run = self, JITFunction.run

        def run(fn, *args, grid, warmup, **kwargs):
            kernel = jit_run(fn, *args, grid=grid, warmup=True, **kwargs)
            meta = {k: v for k, v in kwargs.items() if k.startswith("BLOCK")}
            meta.update(num_warps=kwargs.get("num_warps", 4), num_stages=kwargs.get("num_stages", 3))
            recorder.compiled.append((recorder.arch, recorder.label, fn.__name__, kernel, meta))
            return kernel

        def tuned_run(tuner, *args, **kwargs):  # every candidate kept for this target, none timed
            tuner.nargs = dict(zip(tuner.arg_names, args))
            kernels = [tuner.fn.run(*args, **kwargs, **config.all_kwargs()) for config in tuner.prune_configs(kwargs)]
            tuner.nargs = None
            return kernels[-1]

        JITFunction.run = run
        Autotuner.run = tuned_run


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise RuntimeError(f"{path} is missing: this triton wheel does not ship the NVIDIA tools the gate needs")
    return str(path)


def inspect_cubin(cubin: bytes, name: str) -> tuple[int, int, str]:
    """(registers, spill bytes = stack + local, tensor-core instruction families) of one kernel's cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
    mma = sorted(set(re.findall(r"\b(" + "|".join(TENSOR_CORE) + r")\b", sass)))
    return int(fields.get("REG", 0)), int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0)), "+".join(mma)


def analyse(records, errors) -> list[Row]:
    rows: dict[tuple, Row] = {}
    for arch_name, label, name, kernel, meta in records:
        arch = ARCHS[arch_name]
        dtype = label.split("/")[0]
        config = " ".join(f"{k.removeprefix('BLOCK_')}={v}" for k, v in meta.items() if k.startswith("BLOCK")
                          and k != "BLOCK_E")
        config = f"{config} w{meta['num_warps']} s{meta['num_stages']}".strip()
        key = (arch_name, name, kernel.hash if hasattr(kernel, "hash") else id(kernel))
        if key in rows:
            if label not in rows[key].families:
                rows[key].families.append(label)
            continue
        row = Row(arch_name, name, config, dtype, [label], smem_limit=SMEM_LIMIT[arch])
        row.smem = int(kernel.metadata.shared)
        row.matmul = "tt.dot" in kernel.asm.get("ttir", "")
        row.regs, row.spill_bytes, row.mma = inspect_cubin(kernel.asm["cubin"], name)
        if row.spill_bytes:
            row.problems.append(f"spills {row.spill_bytes} B (stack/local)")
        if row.smem > row.smem_limit:
            row.problems.append(f"shared memory {row.smem} B over the {row.smem_limit} B limit of {arch_name}")
        wanted = MMA_FAMILY[arch] if not (arch == 90 and meta.get("BLOCK_E", 0) > 128) else ("HGMMA", "HMMA")
        if row.matmul and not any(family in row.mma.split("+") for family in wanted):
            row.problems.append(f"no tensor-core instruction of {arch_name} ({'/'.join(wanted)}) in the SASS")
        rows[key] = row
    out = list(rows.values())
    for arch_name, label, message in errors:
        out.append(Row(arch_name, label.split("/", 1)[1], "", label.split("/")[0], [label],
                       problems=[f"compile error: {message}"]))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The cases: the project's entry points, at shapes whose specialisation matches the named families.

def _dtype(name):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def attention_case(e: int, heads: int, kv_heads: int, causal: bool, padded: bool, t: int = 256,
                   backward: str = "one_pass", documents: bool = False, ev: int | None = None):
    """``ev``: a value head dim other than ``e`` (multi-head latent attention's q/k 192, v 128): q and k are views
    of one (B, T, H + K, E) projection, v of its own (B, T, K, Ev) one."""
    def run(dtype):
        import os

        import torch

        from pretrain.kernels.attention import flash_attention

        os.environ["PRETRAIN_ATTENTION_BACKWARD"] = backward

        if ev is None:
            x = torch.zeros(1, t, heads + 2 * kv_heads, e, dtype=dtype)  # the model's (B, T, H, E) projections
            q, k, v = (y.transpose(1, 2).requires_grad_() for y in x.split([heads, kv_heads, kv_heads], dim=2))
        else:
            x = torch.zeros(1, t, heads + kv_heads, e, dtype=dtype)
            q, k = (y.transpose(1, 2).requires_grad_() for y in x.split([heads, kv_heads], dim=2))
            v = torch.zeros(1, t, kv_heads, ev, dtype=dtype).transpose(1, 2).requires_grad_()
        mask = torch.ones(1, t, dtype=torch.bool) if padded else None
        ids = torch.arange(t)[None] // 64 if documents else None  # document masking (data.document_mask)
        out = flash_attention(q, k, v, causal=causal, key_padding_mask=mask, document_ids=ids)
        out.backward(torch.zeros_like(out))
        os.environ.pop("PRETRAIN_ATTENTION_BACKWARD")
    return run


def norm_case(d: int, rms: bool):
    def run(dtype):
        import torch

        from pretrain.kernels.norms import layer_norm, rms_norm

        x = torch.zeros(4, d, dtype=dtype, requires_grad=True)
        w = torch.ones(d, dtype=dtype, requires_grad=True)
        y = rms_norm(x, w) if rms else layer_norm(x, w, torch.zeros(d, dtype=dtype, requires_grad=True))
        y.backward(torch.zeros_like(y))
    return run


def add_norm_case(d: int, rms: bool):
    """The norm with the residual add fused in: both outputs used, so the backward adds the residual's gradient."""
    def run(dtype):
        import torch

        from pretrain.kernels.norms import add_layer_norm, add_rms_norm

        x, r = (torch.zeros(4, d, dtype=dtype, requires_grad=True) for _ in range(2))
        w = torch.ones(d, dtype=dtype, requires_grad=True)
        s, y = add_rms_norm(x, r, w) if rms else add_layer_norm(x, r, w, torch.zeros(d, dtype=dtype, requires_grad=True))
        (s.sum() + y.sum()).backward()
    return run


def rotary_case(e: int, heads: int):
    def run(dtype):
        import torch

        from pretrain.kernels.rotary import rotary

        x = torch.zeros(1, 16, heads, e, dtype=dtype).transpose(1, 2).requires_grad_()
        y = rotary(x, torch.ones(16, e, dtype=dtype), torch.zeros(16, e, dtype=dtype))
        y.backward(torch.zeros_like(y))
    return run


def swiglu_case(f: int):
    def run(dtype):
        import torch

        from pretrain.kernels.swiglu import swiglu, swiglu_packed

        g, u = (torch.zeros(8, f, dtype=dtype, requires_grad=True) for _ in range(2))
        y = swiglu(g, u)
        y.backward(torch.zeros_like(y))
        gu = torch.zeros(8, 2 * f, dtype=dtype, requires_grad=True)  # a fused gate/up projection's output
        y = swiglu_packed(gu)
        y.backward(torch.zeros_like(y))
    return run


def cross_entropy_case(d: int, v: int):
    def run(dtype):
        import torch

        from pretrain.kernels.cross_entropy import linear_cross_entropy

        hidden = torch.zeros(8, d, dtype=dtype, requires_grad=True)
        weight = torch.zeros(v, d, dtype=dtype, requires_grad=True)
        linear_cross_entropy(hidden, weight, torch.zeros(8, dtype=torch.long)).backward()
    return run


def adamw_case():
    def run(dtype):
        import torch

        from pretrain.kernels.adamw import FusedAdamW

        params = [torch.zeros(4096, dtype=dtype, requires_grad=True), torch.zeros(64, 48, dtype=dtype,
                                                                                  requires_grad=True)]
        for p in params:
            p.grad = torch.zeros_like(p)
        FusedAdamW(params, master_weights=dtype != torch.float32).step()
    return run


def cases(full: bool = False) -> list[tuple[str, Callable, tuple[str, ...]]]:
    """(family, run(dtype), dtypes). Families: the presets in configs/ and the extra head dims the kernels accept.

    Compile-time specialisation is what a family must reproduce: constexprs (block sizes from the head dim /
    model dim, causal, padded), dtypes, and which integers are multiples of 16 (sequence lengths, strides).
    Head counts, GQA ratios and sequence lengths are runtime values, so the attention families run at T = 256
    with the preset's head layout; vocab sizes enter the cross-entropy only at run time (a few rows suffice).
    Head dims are runtime values too (80, 96 and 128 share the 128-wide build; up to 64, the 64-wide one), so
    one family stands for several. fp16 compiles to the same tiles as bf16 (16-bit operands, fp32 accumulators):
    it is checked on the main GPT family and every small kernel, and on every family with ``full`` (which also
    adds the padded 128- and 256-wide builds) — the default keeps the gate within about three minutes on two cores.
    """
    both, bf16 = DTYPES, ("bf16",) if not full else DTYPES
    return [
        ("attention E128 causal (gpt_1b/7b MHA 32; GQA 32:8; E80)", attention_case(128, 32, 8, True, False), both),
        ("attention E128 causal, split backward (PRETRAIN_ATTENTION_BACKWARD=split)",
         attention_case(128, 32, 8, True, False, backward="split"), both),
        ("attention E64 causal (gpt_125m, gpt_tiny: E <= 64 share it)", attention_case(64, 12, 12, True, False), bf16),
        ("attention E64 padded (bert_base/large/tiny)", attention_case(64, 16, 16, False, True), bf16),
        ("attention E256 causal", attention_case(256, 4, 4, True, False), bf16),
        ("attention E128 causal, documents (data.document_mask)",
         attention_case(128, 32, 8, True, False, documents=True), both),
        ("attention E128 causal, documents, split backward",
         attention_case(128, 32, 8, True, False, backward="split", documents=True), bf16),
        ("attention E64 causal, documents", attention_case(64, 12, 12, True, False, documents=True), bf16),
        ("attention E64 padded, documents (BERT packing)", attention_case(64, 16, 16, False, True, documents=True),
         bf16),
        ("attention E256 causal, documents", attention_case(256, 4, 4, True, False, documents=True), bf16),
        ("attention E192 Ev128 causal (MLA: deepseek_16b, DeepSeek-V3)", attention_case(192, 16, 16, True, False,
                                                                                          ev=128), bf16),
        ("attention E192 Ev128 causal, documents (MLA)", attention_case(192, 16, 16, True, False, documents=True,
                                                                       ev=128), bf16),
        ("attention E48 Ev32 causal, documents (MLA: deepseek_tiny; 64-wide both, the value bounds apart)",
         attention_case(48, 8, 8, True, False, documents=True, ev=32), bf16),
        ("attention E192 Ev128 causal, split backward (MLA)", attention_case(192, 16, 16, True, False,
                                                                            backward="split", ev=128), bf16),
        *([("attention E96 padded (E80-128 bidirectional)", attention_case(96, 8, 8, False, True), both),
           ("attention E256 padded", attention_case(256, 4, 4, False, True), both)] if full else []),
        *[(f"rms_norm D{d}", norm_case(d, True), both) for d in (256, 2048, 4096, 8192)],
        *[(f"layer_norm D{d}", norm_case(d, False), both) for d in (128, 768, 1024)],
        *[(f"add_rms_norm D{d}", add_norm_case(d, True), both) for d in (2048, 4096)],
        ("add_layer_norm D768", add_norm_case(768, False), both),
        *[(f"rotary E{e}", rotary_case(e, 4), both) for e in (32, 128)],
        ("linear_cross_entropy D2048 V32000", cross_entropy_case(2048, 32000), both),
        ("swiglu F5632", swiglu_case(5632), both),
        ("adamw (master weights)", adamw_case(), both),
        ("adamw fp32", adamw_case(), ("fp32",)),
    ]


def load_extra(path: str) -> list:
    """Cases from a Python file defining ``CASES`` like :func:`cases` (tests plant broken kernels this way)."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.CASES


def jobs(archs: list[str], full: bool = False, extra: str | None = None, only: str | None = None) -> list[tuple]:
    """(arch, family, run, dtype) for every compile the gate makes, heaviest first (for sharding)."""
    chosen = load_extra(extra) if extra else cases(full)
    out = [(arch, family, run, dtype) for arch in archs for family, run, dtypes in chosen for dtype in dtypes
           if not only or only in family]
    return sorted(out, key=lambda job: -_weight(job[0], job[1]))


def _weight(arch: str, family: str) -> float:
    """Rough compile seconds (measured here): attention families ~6 kernels of ~2–4 s; sm_100a is the slowest."""
    return (20.0 if family.startswith("attention") else 2.0) * (1.5 if arch == "sm_100a" else 1.0)


def shard(all_jobs: list[tuple], index: int, count: int) -> list[tuple]:
    """The jobs of shard ``index`` of ``count``: greedy balance of the weights, deterministic."""
    loads, mine = [0.0] * count, []
    for job in all_jobs:
        target = loads.index(min(loads))
        loads[target] += _weight(job[0], job[1])
        if target == index:
            mine.append(job)
    return mine


def check(archs: list[str], full: bool = False, extra: str | None = None, only: str | None = None,
          shard_index: int = 0, shard_count: int = 1) -> list[Row]:
    """Compile this shard's jobs in this process. Must run without TRITON_INTERPRET (a fresh process)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the compile gate needs TRITON_INTERPRET unset: the interpreter compiles nothing")
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="pretrain-compile-check-")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        from triton.runtime.driver import driver

        drivers = {arch: CompileOnlyDriver(ARCHS[arch]) for arch in archs}
        recorder = Recorder()
        recorder.install()
        errors = []
        for arch, family, run, dtype in shard(jobs(archs, full, extra, only), shard_index, shard_count):
            driver.set_active(drivers[arch])
            recorder.arch, recorder.label = arch, f"{dtype}/{family}"
            try:
                run(_dtype(dtype))
            except Exception as exc:  # a compile error: report it, go on with the rest
                errors.append((arch, recorder.label, _first_line(exc)))
        return analyse(recorder.compiled, errors)
    finally:
        shutil.rmtree(os.environ["TRITON_CACHE_DIR"], ignore_errors=True)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    for line in reversed(text.splitlines()):  # triton's CompilationError puts the cause after the source excerpt
        if line.strip() and not line.startswith(" "):
            return f"{type(exc).__name__}: {line.strip()}"[:300]
    return f"{type(exc).__name__}: {''.join(traceback.format_exception_only(exc)).strip()}"[:300]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="compile every Triton kernel for NVIDIA archs, without a GPU")
    parser.add_argument("--arch", nargs="+", required=True, choices=sorted(ARCHS))
    parser.add_argument("--shard", default="0/1", help="I/N: the I-th of N balanced parts of the jobs")
    parser.add_argument("--json", required=True, help="where to write the rows")
    parser.add_argument("--full", action="store_true", help="fp16 on every family too")
    parser.add_argument("--cases", help="a Python file defining CASES, instead of the project's kernels")
    parser.add_argument("--only", help="only the families whose name contains this")
    args = parser.parse_args(argv)
    start = time.time()
    index, count = (int(x) for x in args.shard.split("/"))
    rows = check(args.arch, args.full, args.cases, args.only, index, count)
    tmp = Path(args.json).with_suffix(".tmp")
    tmp.write_text(json.dumps({"arch": args.arch, "seconds": round(time.time() - start, 1),
                               "rows": [asdict(r) for r in rows]}, indent=1))
    tmp.replace(args.json)
    return 1 if any(r.problems for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
