"""Kernel microbenchmarks: each op against the torch reference and the strongest baselines in the same run.

Timing: ``triton.testing.do_bench`` (median, CUDA). FLOPs and bytes are counted by hand per case; the roofline
is measured on the spot: copy bandwidth (a device-to-device clone) and matmul rate (a bf16 GEMM), so "% of peak"
is against what this GPU does, not a datasheet. Results go to a CSV keyed by device + commit, and a PNG.
Without CUDA, ``check()`` runs each op once on small shapes in the interpreter against the reference.
"""

from __future__ import annotations

import csv
import datetime
import os
import subprocess
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from pretrain.kernels import reference

OPS = ("attention", "adamw", "rmsnorm", "layernorm", "cross_entropy", "rotary", "swiglu")


@dataclass
class Case:
    op: str
    shape: str
    impl: str
    fn: Callable
    flops: float
    bytes: float


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def measure_peaks(dtype=torch.bfloat16) -> tuple[float, float]:
    """(copy GB/s, matmul TFLOP/s) measured on this device."""
    from triton.testing import do_bench

    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    ms = do_bench(lambda: x.clone())
    bandwidth = 2 * x.numel() / (ms * 1e-3) / 1e9
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    ms = do_bench(lambda: a @ a)
    return bandwidth, 2 * 8192 ** 3 / (ms * 1e-3) / 1e12


def attention_cases(dtype, batch: int, heads: int, seq: int, head_dim: int, causal: bool = True,
                    doc_lens: tuple[int, ...] = ()) -> list[Case]:
    """SDPA's backends, flash-attn where installed and ours at one shape; with ``doc_lens``, ours on rows packed
    with documents of each length (``document_ids``): FLOPs counted as the useful work (each document's own
    triangle), so the time beside the full-causal row shows what the skipped blocks save."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pretrain.kernels.attention import flash_attention

    q, k, v = (torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=dtype, requires_grad=True)
               for _ in range(3))
    do = torch.randn_like(q)
    flops = 4 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)
    io = 4 * q.numel() * q.element_size()
    shape = f"B{batch} H{heads} T{seq} E{head_dim}"
    impls = {"triton": lambda: flash_attention(q, k, v, causal=causal)}
    backends = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
                "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}
    for name, backend in backends.items():
        def run(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        try:
            run()
        except RuntimeError:
            continue  # this backend does not take these inputs here
        impls[name] = run
    try:
        from flash_attn import flash_attn_func

        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        impls["flash_attn"] = lambda: flash_attn_func(qt, kt, vt, causal=causal)
    except ImportError:
        pass
    cases = []
    for name, fn in impls.items():
        cases.append(Case("attention_fwd", shape, name, fn, flops, io))

        def fwd_bwd(fn=fn):
            out = fn()
            torch.autograd.grad(out, (q, k, v), do)
        cases.append(Case("attention_fwd_bwd", shape, name, fwd_bwd, 3.5 * flops, 2.5 * io))

    def split_fwd_bwd():  # the triton row runs the one-pass backward; this one the split one (its 7 matmuls)
        import os

        os.environ["PRETRAIN_ATTENTION_BACKWARD"] = "split"
        try:
            torch.autograd.grad(flash_attention(q, k, v, causal=causal), (q, k, v), do)
        finally:
            os.environ.pop("PRETRAIN_ATTENTION_BACKWARD")
    cases.append(Case("attention_fwd_bwd", shape, "triton_split_bwd", split_fwd_bwd, 3.5 * flops, 2.5 * io))
    for length in doc_lens:
        ids = (torch.arange(seq, device="cuda") // length).expand(batch, seq)
        docs, tail = divmod(seq, length)
        pairs = (docs * length * (length + 1) / 2 + tail * (tail + 1) / 2 if causal else
                 docs * length ** 2 + tail ** 2)
        useful = 4 * batch * heads * head_dim * pairs

        def packed(ids=ids):
            return flash_attention(q, k, v, causal=causal, document_ids=ids)

        def packed_fwd_bwd(packed=packed):
            torch.autograd.grad(packed(), (q, k, v), do)
        cases.append(Case("attention_fwd", f"{shape} docs{length}", "triton", packed, useful, io))
        cases.append(Case("attention_fwd_bwd", f"{shape} docs{length}", "triton", packed_fwd_bwd, 3.5 * useful,
                          2.5 * io))
    return cases


def norm_cases(op: str, dtype, rows: int, dim: int) -> list[Case]:
    from pretrain.kernels.norms import add_layer_norm, add_rms_norm, layer_norm, rms_norm

    x = torch.randn(rows, dim, device="cuda", dtype=dtype)
    r = torch.randn(rows, dim, device="cuda", dtype=dtype)
    w = torch.randn(dim, device="cuda", dtype=dtype)
    b = torch.randn(dim, device="cuda", dtype=dtype)
    io = 2 * x.numel() * x.element_size()
    shape = f"{rows}x{dim}"
    if op == "rmsnorm":
        impls = {"triton": lambda: rms_norm(x, w), "torch_F.rms_norm": lambda: F.rms_norm(x, (dim,), w, 1e-6),
                 "reference": lambda: reference.rms_norm(x, w, 1e-6)}
    else:
        impls = {"triton": lambda: layer_norm(x, w, b), "torch_F.layer_norm": lambda: F.layer_norm(x, (dim,), w, b),
                 "reference": lambda: reference.layer_norm(x, w, b, 1e-5)}
        try:
            from apex.normalization import FusedLayerNorm

            apex_norm = FusedLayerNorm(dim).to("cuda", dtype)
            impls["apex"] = lambda: apex_norm(x)
        except ImportError:
            pass
    cases = [Case(op, shape, name, fn, 8.0 * x.numel(), io) for name, fn in impls.items()]
    # a pre-norm block's residual add and the norm after it: one kernel (reads x, r; writes x + r and y) against
    # torch's add then its norm
    if op == "rmsnorm":
        fused = {"triton_add_norm": lambda: add_rms_norm(x, r, w),
                 "torch_add_then_F.rms_norm": lambda: F.rms_norm(x + r, (dim,), w, 1e-6)}
    else:
        fused = {"triton_add_norm": lambda: add_layer_norm(x, r, w, b),
                 "torch_add_then_F.layer_norm": lambda: F.layer_norm(x + r, (dim,), w, b)}
    return cases + [Case(op, shape, name, fn, 9.0 * x.numel(), 2 * io) for name, fn in fused.items()]


def rotary_cases(dtype, batch: int, heads: int, seq: int, head_dim: int) -> list[Case]:
    from pretrain.kernels.rotary import rotary

    x = torch.randn(batch, heads, seq, head_dim, device="cuda", dtype=dtype)
    cos, sin = torch.randn(seq, head_dim, device="cuda", dtype=dtype), torch.randn(seq, head_dim, device="cuda", dtype=dtype)
    io = 2 * x.numel() * x.element_size()
    shape = f"B{batch} H{heads} T{seq} E{head_dim}"
    return [Case("rotary", shape, "triton", lambda: rotary(x, cos, sin), 3.0 * x.numel(), io),
            Case("rotary", shape, "reference", lambda: reference.rotary(x, cos, sin), 3.0 * x.numel(), io)]


def swiglu_cases(dtype, tokens: int, hidden: int) -> list[Case]:
    """Forward + backward: the fused pair against torch's silu and mul (what the model ran before)."""
    from pretrain.kernels.swiglu import swiglu, swiglu_packed

    g, u = (torch.randn(tokens, hidden, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    dh = torch.randn(tokens, hidden, device="cuda", dtype=dtype)
    io = 8 * g.numel() * g.element_size()  # fused: 3 tensors forward, 5 backward
    shape = f"N{tokens} F{hidden}"

    def step(fn):
        return lambda: torch.autograd.grad(fn(g, u), (g, u), dh)

    gu = torch.cat([g, u], dim=-1).detach().requires_grad_()  # a fused gate/up projection's output
    packed = lambda: torch.autograd.grad(swiglu_packed(gu), gu, dh)  # noqa: E731
    return [Case("swiglu", shape, "triton", step(swiglu), 12.0 * g.numel(), io),
            Case("swiglu", shape, "triton_packed", packed, 12.0 * g.numel(), io),
            Case("swiglu", shape, "reference", step(lambda a, b: F.silu(a) * b), 12.0 * g.numel(), io)]


def cross_entropy_cases(dtype, tokens: int, dim: int, vocab: int) -> list[Case]:
    from pretrain.kernels.cross_entropy import linear_cross_entropy

    h = torch.randn(tokens, dim, device="cuda", dtype=dtype, requires_grad=True)
    w = (0.02 * torch.randn(vocab, dim, device="cuda", dtype=dtype)).requires_grad_()
    t = torch.randint(0, vocab, (tokens,), device="cuda")
    flops = 6.0 * tokens * dim * vocab
    shape = f"N{tokens} D{dim} V{vocab}"

    def fused():
        torch.autograd.grad(linear_cross_entropy(h, w, t), (h, w))

    def unfused():
        torch.autograd.grad(F.cross_entropy((h @ w.t()).float(), t), (h, w))
    io = (tokens * dim + vocab * dim) * h.element_size() * 3
    return [Case("cross_entropy_fwd_bwd", shape, "triton_fused", fused, flops, io),
            Case("cross_entropy_fwd_bwd", shape, "torch_unfused", unfused, flops, io)]


def adamw_cases(numel: int) -> list[Case]:
    from pretrain.kernels.adamw import FusedAdamW

    sizes = [numel // 64] * 64  # a model's worth of tensors
    cases = []
    for name in ("triton", "torch_foreach", "torch_fused"):
        params = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in sizes]
        for p in params:
            p.grad = torch.randn_like(p)
        if name == "triton":
            opt = FusedAdamW(params, lr=1e-4)
        else:
            opt = torch.optim.AdamW(params, lr=1e-4, foreach=name == "torch_foreach", fused=name == "torch_fused")
        cases.append(Case("adamw", f"{numel / 1e6:.0f}M params", name, opt.step, 12.0 * numel, 28.0 * numel))
    try:
        from apex.optimizers import FusedAdam

        params = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in sizes]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = FusedAdam(params, lr=1e-4, adam_w_mode=True)
        cases.append(Case("adamw", f"{numel / 1e6:.0f}M params", "apex", opt.step, 12.0 * numel, 28.0 * numel))
    except ImportError:
        pass
    return cases


class PeakLiveBytes:
    """Peak bytes of tensor storage made inside the block and alive at once (any device, CPU included).

    A ``TorchDispatchMode`` sees every op's outputs; a storage counts from the op that made it until its last
    reference dies. Storages of ``keep`` (the inputs) and in-place results are not new. Custom ops listed in
    ``expand`` (op -> its Python body) are run inside the mode, so their own temporaries count too.
    """

    def __init__(self, keep=(), expand=None):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self
        self.live = self.peak = 0
        self.seen = {t.untyped_storage().data_ptr() for t in keep}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                body = (expand or {}).get(func)
                if body is not None:
                    with self:
                        out = body(*args, **(kwargs or {}))
                else:
                    out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        tracker._made(t.untyped_storage())
                return out

        self.mode = Mode()

    def _made(self, storage) -> None:
        ptr, size = storage.data_ptr(), storage.nbytes()
        if size and ptr not in self.seen:
            self.seen.add(ptr)
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, ptr, size)

    def _freed(self, ptr: int, size: int) -> None:
        self.seen.discard(ptr)
        self.live -= size

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def cross_entropy_memory(tokens: int, dim: int, vocab: int, dtype=torch.bfloat16) -> dict[str, int]:
    """Peak bytes above the inputs of one forward + backward: fused ``linear_cross_entropy`` against unfused
    ``F.linear`` + ``F.cross_entropy`` (logits upcast to fp32, as a model computing its loss in fp32 does).

    Without a GPU the Triton launches are made compile-only for sm_90a (``pretrain.kernels.compile_check``): the kernels
    write into buffers the host code has already allocated, so skipping their arithmetic changes no allocation,
    and the full-size shapes take seconds instead of hours in the interpreter. The gradients are then not values.
    """
    from pretrain.kernels import cross_entropy

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise RuntimeError("cross_entropy_memory on CPU needs TRITON_INTERPRET unset (launches compile only)")
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        from triton.runtime.driver import driver

        from pretrain.kernels.compile_check import CompileOnlyDriver, Recorder

        driver.set_active(CompileOnlyDriver(90))
        Recorder().install()
    torch.manual_seed(0)
    h = torch.randn(tokens, dim, device=device, dtype=dtype, requires_grad=True)
    w = (0.02 * torch.randn(vocab, dim, device=device, dtype=dtype)).requires_grad_()
    t = torch.randint(0, vocab, (tokens,), device=device)
    expand = {torch.ops.pretrain.linear_cross_entropy_fwd.default: cross_entropy.forward_and_gradients}
    variants = {"fused": lambda: cross_entropy.linear_cross_entropy(h, w, t),
                "unfused": lambda: F.cross_entropy(F.linear(h, w).float(), t)}
    peaks = {}
    for name, loss_fn in variants.items():
        with PeakLiveBytes(keep=(h, w, t), expand=expand) as tracker:
            grads = torch.autograd.grad(loss_fn(), (h, w))
            del grads
        peaks[name] = tracker.peak
    return peaks


def cases_for(op: str, dtype, seq_lens: list[int], doc_lens: tuple[int, ...] = ()) -> list[Case]:
    if op == "attention":
        return [c for t in seq_lens for c in attention_cases(dtype, max(1, 16384 // t), 16, t, 128,
                                                               doc_lens=tuple(n for n in doc_lens if n < t))]
    if op in ("rmsnorm", "layernorm"):
        return norm_cases(op, dtype, 16384, 4096)
    if op == "rotary":
        return rotary_cases(dtype, 4, 32, 4096, 128)
    if op == "cross_entropy":
        return cross_entropy_cases(dtype, 8192, 4096, 131072)
    if op == "swiglu":
        return swiglu_cases(dtype, 16384, 5632)
    if op == "adamw":
        return adamw_cases(256 << 20)
    raise ValueError(f"unknown op {op!r}: one of {', '.join(OPS)}")


def run(ops: list[str], dtype, seq_lens: list[int], out_dir: Path, doc_lens: tuple[int, ...] = ()) -> list[dict]:
    from triton.testing import do_bench

    bandwidth, matmul = measure_peaks(dtype if dtype != torch.float32 else torch.bfloat16)
    device = torch.cuda.get_device_name().replace(" ", "_")
    rows = []
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"kernels-{device}-{commit()}"
    with open(out_dir / f"{stem}.csv", "w", newline="") as f:  # row by row: a run cut short keeps what it measured
        writer = None
        for case in (case for op in ops for case in cases_for(op, dtype, seq_lens, doc_lens)):
            torch.cuda.reset_peak_memory_stats()
            ms = do_bench(case.fn)
            tflops = case.flops / (ms * 1e-3) / 1e12
            gbs = case.bytes / (ms * 1e-3) / 1e9
            rows.append({"device": device, "commit": commit(), "date": datetime.date.today().isoformat(),
                         "op": case.op, "shape": case.shape, "impl": case.impl, "dtype": str(dtype).split(".")[-1],
                         "ms": round(ms, 4), "tflops": round(tflops, 2), "gbs": round(gbs, 1),
                         "pct_matmul_peak": round(100 * tflops / matmul, 1),
                         "pct_copy_bandwidth": round(100 * gbs / bandwidth, 1),
                         "peak_mem_mib": round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)})
            if writer is None:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
            writer.writerow(rows[-1])
            f.flush()
            print(f"{case.op:22s} {case.shape:24s} {case.impl:16s} {ms:9.3f} ms {tflops:8.1f} TFLOP/s "
                  f"{gbs:8.1f} GB/s", flush=True)
    plot(rows, out_dir / f"{stem}.png", bandwidth, matmul)
    print(f"measured peaks: copy {bandwidth:.0f} GB/s, matmul {matmul:.0f} TFLOP/s; wrote {out_dir / stem}.csv/.png")
    return rows


def plot(rows: list[dict], path: Path, bandwidth: float, matmul: float) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot (pip install -e '.[plot]')")
        return
    groups = sorted({(r["op"], r["shape"]) for r in rows})
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 2.2 * len(groups)), squeeze=False)
    for ax, (op, shape) in zip(axes[:, 0], groups):
        mine = [r for r in rows if r["op"] == op and r["shape"] == shape]
        ax.barh([r["impl"] for r in mine], [r["ms"] for r in mine])
        ax.set_title(f"{op} {shape} (ms, lower is better)", fontsize=9)
    fig.suptitle(f"peaks: copy {bandwidth:.0f} GB/s, matmul {matmul:.0f} TFLOP/s", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def check() -> list[str]:
    """Correctness only, small shapes, wherever the kernels run (the interpreter on CPU)."""
    from pretrain.kernels.adamw import FusedAdamW
    from pretrain.kernels.attention import flash_attention
    from pretrain.kernels.cross_entropy import linear_cross_entropy
    from pretrain.kernels.norms import layer_norm, rms_norm
    from pretrain.kernels.rotary import rotary
    from pretrain.kernels.swiglu import swiglu, swiglu_packed

    torch.manual_seed(0)
    report = []

    def close(name, a, b, tol=1e-4):
        err = float((a - b).abs().max())
        report.append(f"{name:14s} max abs err {err:.2e} {'ok' if err <= tol else 'FAILED'}")
        return err <= tol

    q, k, v = (torch.randn(1, 2, 37, 48) for _ in range(3))
    ok = close("attention", flash_attention(q, k, v), reference.attention(q, k, v))
    ids = torch.tensor([[0] * 5 + [1] * 20 + [2] * 12])
    ok &= close("attention docs", flash_attention(q, k, v, document_ids=ids),
                reference.attention(q, k, v, document_ids=ids))
    x, w, b = torch.randn(37, 80), torch.rand(80) + 0.5, torch.randn(80)
    ok &= close("rmsnorm", rms_norm(x, w), reference.rms_norm(x, w, 1e-6))
    ok &= close("layernorm", layer_norm(x, w, b), reference.layer_norm(x, w, b, 1e-5))
    cos, sin = torch.randn(37, 48), torch.randn(37, 48)
    ok &= close("rotary", rotary(q, cos, sin), reference.rotary(q, cos, sin))
    g, u = torch.randn(37, 130) * 3, torch.randn(37, 130)
    ok &= close("swiglu", swiglu(g, u), reference.swiglu(g, u))
    gu = torch.cat([g, u], dim=-1)
    ok &= close("swiglu_packed", swiglu_packed(gu), reference.swiglu_packed(gu))
    h, wt, t = torch.randn(37, 48), torch.randn(1000, 48) * 0.05, torch.randint(0, 1000, (37,))
    ok &= close("cross_entropy", linear_cross_entropy(h, wt, t), reference.linear_cross_entropy(h, wt, t))
    p1, p2 = torch.nn.Parameter(torch.randn(100)), torch.nn.Parameter(torch.randn(100))
    p2.data.copy_(p1.data)
    p1.grad = torch.randn(100)
    p2.grad = p1.grad.clone()
    FusedAdamW([p1], lr=1e-2).step()
    torch.optim.AdamW([p2], lr=1e-2).step()
    ok &= close("adamw", p1.data, p2.data, 1e-6)
    report.append("all ok" if ok else "FAILED")
    return report
