"""The step-cost meter: what one training step of a config costs, counted on this machine, read as a GPU runs it.

A few layers of the config's model run forward + backward (and the optimizer steps once) on the CPU, at reduced
token counts, under a ``TorchDispatchMode`` that sees every kernel the step would launch and records per op:

- matmul FLOPs (``mm``, ``addmm``, ``bmm``, ``_grouped_mm`` ...: 2·M·N·K),
- attention FLOPs: SDPA counted as FlashAttention-2 does the work (forward 4·B·H·E·pairs, backward 2.5× that,
  pairs = T(T+1)/2 causal), the project's Triton kernels by what they declare (``COSTS`` in each kernel module),
- bytes read + written by every other op (a tensor's distinct elements × element size; views, ``empty`` and
  other metadata are free) — the "non-matmul traffic",
- kernel launches (every op that is not free), host syncs (``aten._local_scalar_dense``: ``.item()``,
  ``int(t)``, ``.tolist()``, also inside the project's custom ops).

Two token counts × two layer counts separate what scales with tokens from what a micro-batch pays once and a
layer from the rest of the model: ``bytes = a·tokens + b`` per layer; a second micro-batch in the same step
splits ``b`` into what each micro-batch pays and what the step pays once (autocast's weight casts: the engine
enters autocast once a step). ``roofline``
then reads the step at the config's real micro-batch, sequence length, accumulation and layout: matmuls at the
GPU's large-GEMM throughput scaled by matmul width, attention at ``attention_efficiency`` of it, everything else
at ``hbm_efficiency`` of the HBM bandwidth, plus ``launch_us`` per launch (``pretrain.plan.hardware``). TP, PP
and CP divide each rank's share; their communication is the planner's business (``speed.py``), not the meter's.
The reading is ``roofline.py``'s; this module counts.
"""

from __future__ import annotations

import contextlib
import importlib
from collections import defaultdict
from dataclasses import dataclass, field, replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MATMULS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::addbmm", "aten::_grouped_mm",
           "aten::_scaled_mm", "aten::_scaled_grouped_mm"}
# SDPA kernels: FlashAttention-2's work, forward (QKᵀ and PV) and backward (recomputed QKᵀ, dV, dP, dQ, dK: 2.5×)
SDPA_FORWARD = {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention",
                "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention"}
SDPA_BACKWARD = {name + "_backward" for name in SDPA_FORWARD}
FA2_BACKWARD_OVER_FORWARD = 2.5
# no kernel and no traffic: allocation without initialisation, aliases, metadata
FREE = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided",
        "aten::detach", "aten::alias", "aten::lift_fresh", "aten::set_", "aten::resize_", "aten::record_stream",
        "aten::_unsafe_view", "aten::_reshape_alias", "aten::sym_size", "aten::sym_stride", "aten::sym_numel",
        "aten::is_same_size", "aten::_has_compatible_shallow_copy_type"}
SYNCS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero", "aten::equal",
         "aten::allclose"}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches for ``t``: its distinct elements (a broadcast, stride-0 dimension counts once)."""
    if t.is_sparse:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(tree) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


@dataclass
class Cost:
    """What a span of the step launched (totals)."""

    matmul_flops: float = 0.0
    attention_fwd_flops: float = 0.0
    attention_bwd_flops: float = 0.0
    attention_bytes: float = 0.0  # the attention kernels' own reads and writes (q, k, v, out, lse, grads)
    bytes: float = 0.0  # every other op's reads + writes
    launches: int = 0
    syncs: int = 0
    attention_calls: dict = field(default_factory=lambda: {"fwd": 0, "bwd": 0})  # recomputation adds forwards
    by_op: dict = field(default_factory=lambda: defaultdict(float))  # op name -> bytes
    launches_by_op: dict = field(default_factory=lambda: defaultdict(int))

    def add_op(self, name: str, nbytes: float, launches: int = 1) -> None:
        self.bytes += nbytes
        self.launches += launches
        self.by_op[name] += nbytes
        self.launches_by_op[name] += launches


@dataclass(frozen=True)
class Declared:
    """A custom op's own kernels (what the dispatcher cannot see into): FLOPs, bytes, launches."""

    flops: float = 0.0
    bytes: float = 0.0
    launches: int = 1
    attention: str = ""  # "fwd" | "bwd": the FLOPs are attention's


def sdpa_flops(q: torch.Tensor, k: torch.Tensor, causal: bool, v: torch.Tensor | None = None,
               backward: bool = False) -> float:
    """FlashAttention-2's work over the (causal) pairs: forward QKᵀ and PV, 2·B·H·(E + Ev)·pairs (4·B·H·E·pairs with
    one head dim); backward the recomputed QKᵀ, dK and dQ over E and dP, dV over the value head dim Ev (MLA's
    differs), 2·B·H·(3·E + 2·Ev)·pairs = ``FA2_BACKWARD_OVER_FORWARD`` × the forward with one head dim."""
    b, h, tq, e = q.shape
    tk = k.shape[-2]
    ev = e if v is None else v.shape[-1]
    pairs = tq * (tq + 1) / 2 if causal and tq == tk else tq * tk
    return 2.0 * b * h * ((3 * e + 2 * ev) if backward else (e + ev)) * pairs


def _sdpa_causal(name: str, args, kwargs) -> bool:
    if "is_causal" in kwargs:
        return bool(kwargs["is_causal"])
    # positional is_causal: (q, k, v, dropout_p, is_causal) forward; backward (dout, q, k, v, out, lse, ...)
    flags = [a for a in args if isinstance(a, bool)]
    return bool(flags[0]) if flags else False


class CostMode(TorchDispatchMode):
    """Counts every dispatched op into ``cost``. ``declared`` maps a custom op's name ("pretrain::norm_fwd") to
    a function (args, kwargs, outputs) -> Declared; inside such an op only what it runs through torch is seen
    (its matmuls, allocations, host syncs) and counted on top of the declaration."""

    def __init__(self, cost: Cost, declared: dict | None = None):
        super().__init__()
        self.cost, self.declared = cost, declared or {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name  # "aten::add" for every overload of add
        c = self.cost
        if name in SYNCS:
            c.syncs += 1
            return func(*args, **kwargs)
        if name in self.declared:
            with CostMode(c, self.declared):  # the op's own torch calls, counted too: straight to its kernel
                out = func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args, **kwargs)
            d = Declared(**self.declared[name](args, kwargs, out))
            if d.attention:
                c.attention_calls[d.attention] += 1
                if d.attention == "fwd":
                    c.attention_fwd_flops += d.flops
                else:
                    c.attention_bwd_flops += d.flops
                c.attention_bytes += d.bytes
                c.launches += d.launches
                c.launches_by_op[name] += d.launches
            else:
                c.matmul_flops += d.flops
                c.add_op(name, d.bytes, d.launches)
            return out
        out = func(*args, **kwargs)
        if name in FREE or getattr(func, "is_view", False) or name.startswith(("prim::", "profiler::")):
            return out
        skip = {id(t) for t in _tensors(kwargs.get("out"))}
        if name in NOT_READ and args:
            skip.add(id(args[0]))
        inputs = [t for t in _tensors((args, kwargs)) if id(t) not in skip]
        outputs = _written(func, args, kwargs, out)
        moved = sum(tensor_bytes(t) for t in inputs) + sum(tensor_bytes(t) for t in outputs)
        if name in MATMULS:
            k = inputs[-1].shape[-2] if name == "aten::_grouped_mm" else _contracted(name, args)
            c.matmul_flops += 2.0 * sum(t.numel() for t in outputs[:1]) * k
            c.launches += 1
            c.launches_by_op[name] += 1
        elif name in SDPA_FORWARD:
            c.attention_calls["fwd"] += 1
            c.attention_fwd_flops += sdpa_flops(args[0], args[1], _sdpa_causal(name, args, kwargs), args[2])
            c.attention_bytes += moved
            c.launches += 1
            c.launches_by_op[name] += 1
        elif name in SDPA_BACKWARD:
            c.attention_calls["bwd"] += 1
            q, k, v = args[1], args[2], args[3]
            c.attention_bwd_flops += sdpa_flops(q, k, _sdpa_causal(name, args, kwargs), v, backward=True)
            c.attention_bytes += moved
            c.launches += 1
            c.launches_by_op[name] += 1
        else:
            c.add_op(name, moved)
        return out


# arguments a schema marks as mutated that the kernel writes only in a case a training step does not take (the
# fused Adam kernels unscale gradients in place only under a gradient scaler)
NOT_WRITTEN = {"aten::_fused_adamw_": {"grads"}, "aten::_fused_adam_": {"grads"}}
# in-place ops that only write their destination: ``copy_`` (into a slice), ``fill_`` / ``zero_``
NOT_READ = {"aten::copy_", "aten::fill_", "aten::zero_"}


def _written(func, args, kwargs, out) -> list[torch.Tensor]:
    """What an op writes: its results and the arguments it mutates in place (``add_``, ``_fused_adamw_``'s lists,
    which it returns nothing of), each tensor once."""
    written = {}
    for t in _tensors(out):
        written[id(t)] = t
    skipped = NOT_WRITTEN.get(func._schema.name, ())
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write and arg.name not in skipped:
            value = kwargs.get(arg.name, args[i] if i < len(args) and not arg.kwarg_only else None)
            for t in _tensors(value):
                written[id(t)] = t
    return list(written.values())


def _contracted(name: str, args) -> int:
    """K of a matmul op: the contracted dimension of its first matrix operand."""
    a = args[1] if name in ("aten::addmm", "aten::addmm_", "aten::baddbmm", "aten::addbmm") else args[0]
    return a.shape[-1]


def declared_costs(kernels: str) -> dict:
    """The custom ops' declarations of the kernel modules ``model.kernels`` uses (none for "torch")."""
    from pretrain.models.ops import TRITON_OPS, triton_ops

    costs = {}
    for op in triton_ops(kernels):
        module = importlib.import_module(TRITON_OPS[op][0])
        costs.update(module.COSTS)
    if costs:
        from pretrain.kernels._common import interpreting

        if not interpreting():
            raise RuntimeError("the step-cost meter runs the Triton ops dry on the CPU: set TRITON_INTERPRET=1 "
                               "before the kernels are imported (tools/step_cost.py does)")
    return costs


_COUNTING: list[Cost] = []  # the costs being counted into, innermost last (what _CudaRMSNorm declares into)


@contextlib.contextmanager
def counting(cost: Cost, declared: dict | None = None):
    _COUNTING.append(cost)
    try:
        with CostMode(cost, declared), _dry_launches(bool(declared)):
            yield cost
    finally:
        _COUNTING.pop()


_REAL_RMS_NORM = torch.nn.functional.rms_norm


class _CudaRMSNorm(torch.autograd.Function):
    """``rms_norm`` as CUDA runs it when the weight's dtype is the input's (``ops.torch_rms_norm`` hands it so;
    torchtitan's bf16 parameters have it so): one fused kernel forward (``_fused_rms_norm``: reads x and w, writes
    y and a 4-byte rstd a row) and one backward (``_fused_rms_norm_backward``: reads dy, x, rstd and w, writes dx
    and dw; its per-block partial sums of dw, a row in every few hundred, left out) — what a GPU test of this
    project inspects the dispatch for. The CPU's rms_norm decomposes into pow / mean / rsqrt / mul: its arithmetic
    runs here with the counting paused and this declaration is counted instead, as SDPA is counted as
    FlashAttention-2. With dtypes that differ CUDA decomposes too, and the CPU's decomposition is counted."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            y = _REAL_RMS_NORM(x, (x.shape[-1],), weight, eps)
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        rows = x.numel() // x.shape[-1]
        _COUNTING[-1].add_op("rms_norm (CUDA fused)", tensor_bytes(x) + tensor_bytes(weight) + tensor_bytes(y)
                             + 4 * rows, 1)
        return y

    @staticmethod
    def backward(ctx, dy):
        from torch.utils._python_dispatch import _disable_current_modes

        x, weight = ctx.saved_tensors
        with _disable_current_modes(), torch.enable_grad():
            xx, ww = x.detach().requires_grad_(), weight.detach().requires_grad_()
            dx, dw = torch.autograd.grad(_REAL_RMS_NORM(xx, (x.shape[-1],), ww, ctx.eps), (xx, ww), dy)
        rows = x.numel() // x.shape[-1]
        _COUNTING[-1].add_op("rms_norm_backward (CUDA fused)", tensor_bytes(dy) + tensor_bytes(x) + 4 * rows
                             + tensor_bytes(weight) + tensor_bytes(dx) + tensor_bytes(dw), 1)
        return dx, dw, None


def _cuda_rms_norm(input, normalized_shape, weight=None, eps=None):  # noqa: A002 (F.rms_norm's signature)
    fused = (_COUNTING and weight is not None and weight.dtype == input.dtype and len(normalized_shape) == 1
             and normalized_shape[0] == input.shape[-1])
    if not fused:
        return _REAL_RMS_NORM(input, normalized_shape, weight, eps)
    return _CudaRMSNorm.apply(input, weight, torch.finfo(input.dtype).eps if eps is None else eps)


@contextlib.contextmanager
def _as_cuda_runs():
    """``torch.nn.functional.rms_norm`` counted as CUDA runs it (``_CudaRMSNorm``) while ``measure`` runs a model,
    ours or the peer's."""
    torch.nn.functional.rms_norm = _cuda_rms_norm
    try:
        yield
    finally:
        torch.nn.functional.rms_norm = _REAL_RMS_NORM


@contextlib.contextmanager
def _dry_launches(active: bool):
    """Triton launches do nothing while the meter counts: their costs are declared (``COSTS``), and running them
    in the interpreter (the meter's only way on a CPU) would cost minutes and count the interpreter's own copies.
    Their outputs stay uninitialised, which no count depends on."""
    if not active:
        yield
        return
    from triton.runtime.interpreter import InterpretedFunction

    run = InterpretedFunction.run
    InterpretedFunction.run = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        InterpretedFunction.run = run


# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Measurement:
    """Per layer: ``a`` per token, ``b`` per micro-batch (as every micro-batch after the first pays it: its
    gradients added to the accumulated ones) and ``c`` per step (what a step pays once whatever its micro-batches:
    autocast's weight casts, entered once a step, less what the first micro-batch saves by writing its gradients
    instead of adding them — so ``c`` may be negative); ``outside``: the rest of the model (embedding, head, loss)
    the same way. FLOPs are per token; attention FLOPs at ``seq`` tokens per sequence."""

    kernels: str
    seq: int  # the sequence length the attention numbers are for (the config's)
    matmul_flops_per_token_layer: float
    attention_fwd_flops_per_token_layer: float
    attention_bwd_flops_per_token_layer: float
    attention_bytes_per_token_layer: float
    nonmatmul_bytes_per_token_layer: float
    nonmatmul_bytes_per_microbatch_layer: float
    launches_per_layer: float  # per micro-batch
    outside_matmul_flops_per_token: float
    outside_bytes_per_token: float
    outside_bytes_per_microbatch: float
    outside_launches: float
    syncs_per_microbatch: float
    optimizer_bytes_per_param: float
    optimizer_launches: int
    optimizer_syncs: int
    bytes_by_op: dict  # op -> bytes per token per layer (fitted slope)
    nonmatmul_bytes_per_step_layer: float = 0.0
    outside_bytes_per_step: float = 0.0
    launches_per_step_layer: float = 0.0
    outside_launches_per_step: float = 0.0
    syncs_per_step: float = 0.0
    attn_bwd_over_fwd_flops: float = 0.0  # one backward call's FLOPs over one forward call's (recompute aside)
    runs: list = field(default_factory=list)  # (layers, tokens, micro-batches, Cost totals) as measured


def _optimizer_cost(cfg, n_layers, tokens, kernels, model=None) -> tuple[Cost, int]:
    """One optimizer step over fp32 master parameters (a peer's bf16 model: over ours of the same shape, which
    holds the same parameters), as a GPU run builds it: fused torch AdamW, or the Triton one declared."""
    from pretrain.optim import build_optimizer

    if model is None:
        model, _ = _ours(cfg, n_layers, tokens, kernels)
        optim = replace(cfg.optim, impl="torch")
    else:
        optim = cfg.optim
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    optimizer = build_optimizer(model, replace(optim, name="adamw") if optim.name == "muon" else optim,
                                torch.device("cuda"))
    cost = Cost()
    with _dry_launches(optim.impl == "triton"):
        optimizer.step()  # the first step also creates the state: count a later one
        with CostMode(cost):
            optimizer.step()
    if optim.impl == "triton":  # a raw Triton launch: its declaration
        from pretrain.kernels.adamw import step_cost

        moved, launches = step_cost(optimizer)
        cost.add_op("triton::adamw", moved, launches)
    return cost, sum(p.numel() for p in model.parameters())


def _per_call_ratio(c: Cost) -> float:
    """Attention backward over forward FLOPs per call: activation checkpointing runs the forward again (its
    FLOPs count in the step), which must not read as a cheaper backward."""
    fwd, bwd = c.attention_calls["fwd"], c.attention_calls["bwd"]
    if not fwd or not bwd:
        return 0.0
    return (c.attention_bwd_flops / bwd) / (c.attention_fwd_flops / fwd)


def _slope(y1: float, y2: float, x1: float, x2: float) -> tuple[float, float]:
    a = (y2 - y1) / (x2 - x1)
    return a, y1 - a * x1


def _batch(cfg, tokens: int, generator) -> dict:
    m = cfg.model
    ids = torch.randint(0, m.vocab_size, (1, tokens), generator=generator)
    if m.arch == "bert":
        labels = torch.full_like(ids, -100)
        labels[:, ::7] = ids[:, ::7]
        return {"tokens": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool), "labels": labels}
    return {"tokens": ids, "targets": torch.roll(ids, -1, 1)}


def _ours(cfg, n_layers: int, tokens: int, kernels: str, like: dict | None = None):
    """Our model at ``n_layers`` and its step as the local engine runs it: activation checkpointing as configured
    (its recomputation is counted), the micro-batches under one autocast a step (bf16 configs), each one's loss
    normalised and back-propagated outside it. ``like``: the parameters and buffers of a fresh build at the same
    depth (other tokens) to take instead of drawing them again — seconds a build at a 128k vocabulary."""
    from pretrain.models import build_model
    from pretrain.tasks import task_for

    model_cfg = replace(cfg.model, n_layers=n_layers, seq_len=tokens, kernels=kernels, dropout=0.0,
                        moe_dense_layers=min(cfg.model.moe_dense_layers, n_layers - 1))
    if like is None:
        model = build_model(model_cfg)
    else:
        with torch.device("meta"):
            model = build_model(model_cfg)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for name, t in [*model.named_parameters(), *model.named_buffers()]:
                if name in like and like[name].shape == t.shape:
                    t.copy_(like[name])
                else:  # sized by the tokens (the rotary tables, learned positions): its module's own init
                    model.get_submodule(name.rpartition(".")[0]).reset_parameters()
    _checkpointing(model, cfg)
    task = task_for(cfg.model.arch, cfg.model)

    from pretrain.parallel.mixed_precision import ComputeWeights, bf16_weights, gemm_accumulation

    # bf16 weights over fp32 masters where the engine has them (FSDP's policy at zero_stage 2 / 3, which
    # accumulates bf16 gradients through autograd)
    sharded = cfg.parallel.zero_stage >= 2
    weights = ComputeWeights(model, fuse_accumulation=gemm_accumulation(cfg) and not sharded,
                             fuse_projections=not sharded and not cfg.train.compile,
                             fp32_sums=cfg.train.grad_accum_dtype == "fp32" and not sharded) \
        if bf16_weights(cfg, sharded=sharded) else None

    def step(batches):
        bf16 = cfg.train.dtype == "bf16"
        with (weights.step() if weights is not None else contextlib.nullcontext(),
              torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()):  # once a step
            for batch in batches:
                out = task.loss(model, batch, accuracy=False)
                with torch.autocast("cpu", enabled=False) if bf16 else contextlib.nullcontext():
                    (out.loss_sum / tokens + sum(out.extra_losses.values(), torch.zeros(()))).backward()

    return model, step


def _checkpointing(model, cfg) -> None:
    """The config's activation checkpointing on ``model.layers`` (ours and the peer's alike)."""
    from pretrain.parallel.checkpointing import apply_activation_checkpointing

    p = cfg.parallel
    apply_activation_checkpointing(model, p.activation_checkpointing, p.activation_checkpointing_every)
    model.train()


def _torchtitan(cfg, n_layers: int, tokens: int, kernels: str):
    """torchtitan's Llama-3 of the config's shape (fused wqkv, SDPA causal) as its FSDP training runs it:
    parameters in bf16 (FSDP's ``param_dtype``; no autocast), the loss on fp32 logits."""
    try:
        import torchtitan.models.llama3 as tt
        from torchtitan.models.common.attention import ScaledDotProductAttention
        from torchtitan.models.common.config_utils import make_ffn_config, make_gqa_config
    except ImportError as exc:
        raise RuntimeError(f"--peer torchtitan needs torchtitan ({exc}): pip install torchtitan") from None
    m = cfg.model
    if m.arch != "gpt" or m.flavor != "llama" or m.n_experts:
        raise ValueError("--peer torchtitan compares a dense llama-flavour GPT")
    init = {"weight": torch.nn.init.normal_, "bias": torch.nn.init.zeros_}
    ones = {"weight": torch.nn.init.ones_}
    layers = [tt.Llama3TransformerBlock.Config(
        attention_norm=tt.RMSNorm.Config(normalized_shape=m.d_model, param_init=ones),
        ffn_norm=tt.RMSNorm.Config(normalized_shape=m.d_model, param_init=ones),
        attention=make_gqa_config(dim=m.d_model, n_heads=m.n_heads, n_kv_heads=m.kv_heads, wqkv_param_init=init,
                                  wo_param_init=init, inner_attention=ScaledDotProductAttention.Config(),
                                  fuse_qkv=True, rope=tt.ComplexRoPE.Config(dim=m.head_size, max_seq_len=tokens,
                                                                            theta=m.rope_theta)),
        feed_forward=make_ffn_config(dim=m.d_model, hidden_dim=m.ffn_dim, w1_param_init=init,
                                     w2w3_param_init=init)) for _ in range(n_layers)]
    model = tt.Llama3Model.Config(
        dim=m.d_model, vocab_size=m.vocab_size, layers=layers,
        tok_embeddings=tt.Embedding.Config(num_embeddings=m.vocab_size, embedding_dim=m.d_model, param_init=init),
        norm=tt.RMSNorm.Config(normalized_shape=m.d_model, param_init=ones),
        lm_head=tt.Linear.Config(in_features=m.d_model, out_features=m.vocab_size, param_init=init)).build()
    if cfg.train.dtype == "bf16":  # parameters only: the RoPE table stays complex fp32, as under FSDP
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    _checkpointing(model, cfg)

    def step(batches):
        for batch in batches:
            logits = model(batch["tokens"])
            torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten()).backward()

    return model, step


BUILDERS = {None: _ours, "torchtitan": _torchtitan}


def _measure_runs(cfg, kernels, declared, runs, first, results, seed, peer) -> None:
    """Each run of ``measure`` counted into ``results``, and the optimizer's cost under ``results["optimizer"]``."""
    optimizer_cost, n_params = None, 0
    for index, (n_layers, t, k) in enumerate(runs):
        torch.manual_seed(seed)
        if peer:
            model, step = BUILDERS[peer](cfg, n_layers, t, kernels)
        else:
            model, step = BUILDERS[None](cfg, n_layers, t, kernels, like=first.get(n_layers))
            first.setdefault(n_layers, {name: x.detach() for name, x in [*model.named_parameters(),
                                                                        *model.named_buffers()]})
        batches = [_batch(cfg, t, torch.Generator().manual_seed(seed + i)) for i in range(k)]  # not counted
        cost = Cost()
        with counting(cost, declared):
            step(batches)
        results[n_layers, t, k] = cost
        if optimizer_cost is None and index == 2:  # the optimizer as a GPU run builds it (fused torch AdamW on CUDA),
            # on the depth's last model: the first one's values stay as built for the next two
            optimizer_cost, n_params = _optimizer_cost(cfg, n_layers, t, kernels, model if not peer else None)
        model.zero_grad(set_to_none=True)
        del model, step
        if index == 2:
            first.clear()
    results["optimizer"] = (optimizer_cost, n_params)


def measure(cfg, kernels: str | None = None, tokens: tuple[int, int] = (128, 256), layers: tuple[int, int] = (1, 2),
            seed: int = 0, peer: str | None = None) -> Measurement:
    """Run the config's model (or ``peer``'s of the same shape) at ``layers`` × ``tokens`` (one sequence per
    micro-batch) under the counter and fit the per-layer / per-token split. ``kernels`` overrides
    ``model.kernels`` ("torch" | "triton" | a list)."""
    kernels = "torch" if peer else kernels or cfg.model.kernels
    declared = declared_costs(kernels)
    results = {}
    (l1, l2), (t1, t2) = layers, tokens
    # one micro-batch at every (layers, tokens); a second micro-batch in the same step at t1 tells what a step
    # pays once from what each micro-batch pays. The runs of one depth share the first build's values (ours).
    runs = [(n, t, k) for n in layers for t, k in ((t1, 1), (t2, 1), (t1, 2))]
    with _as_cuda_runs():
        _measure_runs(cfg, kernels, declared, runs, {}, results, seed, peer)
    optimizer_cost, n_params = results.pop("optimizer")

    def per_layer(get):
        """(a per token, b per micro-batch + c per step) of one layer and of the rest, from the one-micro-batch
        runs."""
        a1, b1 = _slope(get(results[l1, t1, 1]), get(results[l1, t2, 1]), t1, t2)
        a2, b2 = _slope(get(results[l2, t1, 1]), get(results[l2, t2, 1]), t1, t2)
        a_layer, b_layer = (a2 - a1) / (l2 - l1), (b2 - b1) / (l2 - l1)
        return a_layer, b_layer, a1 - l1 * a_layer, b1 - l1 * b_layer

    def per_step(get, fit):
        """(b per micro-batch, c per step) of one layer and of the rest: the second micro-batch costs a·t1 + b."""
        a_layer, bc_layer, a_out, bc_out = fit
        extra = {n: get(results[n, t1, 2]) - get(results[n, t1, 1]) for n in layers}
        layer = (extra[l2] - extra[l1]) / (l2 - l1)
        b_layer, b_out = layer - a_layer * t1, extra[l1] - l1 * layer - a_out * t1
        return b_layer, bc_layer - b_layer, b_out, bc_out - b_out

    mm = per_layer(lambda c: c.matmul_flops)
    by_bytes = per_layer(lambda c: c.bytes)
    bytes_split = per_step(lambda c: c.bytes, by_bytes)
    att_bytes = per_layer(lambda c: c.attention_bytes)
    launches = per_layer(lambda c: c.launches)
    launches_split = per_step(lambda c: c.launches, launches)
    syncs_per_microbatch = results[l1, t1, 2].syncs - results[l1, t1, 1].syncs
    # attention FLOPs per token grow with the sequence: read at t2 per layer, then scaled to the config's length
    scale = cfg.model.seq_len / t2
    attn_f = (results[l2, t2, 1].attention_fwd_flops - results[l1, t2, 1].attention_fwd_flops) / (l2 - l1) / t2 * scale
    attn_b = (results[l2, t2, 1].attention_bwd_flops - results[l1, t2, 1].attention_bwd_flops) / (l2 - l1) / t2 * scale
    ops = set().union(*(c.by_op for c in results.values()))
    by_op = {op: per_layer(lambda c, op=op: c.by_op.get(op, 0.0))[0] for op in ops}
    return Measurement(
        kernels=kernels, seq=cfg.model.seq_len,
        matmul_flops_per_token_layer=mm[0], attention_fwd_flops_per_token_layer=attn_f,
        attention_bwd_flops_per_token_layer=attn_b, attention_bytes_per_token_layer=att_bytes[0],
        nonmatmul_bytes_per_token_layer=by_bytes[0], nonmatmul_bytes_per_microbatch_layer=bytes_split[0],
        nonmatmul_bytes_per_step_layer=bytes_split[1],
        launches_per_layer=launches[0] * t1 + launches_split[0], launches_per_step_layer=launches_split[1],
        outside_matmul_flops_per_token=mm[2], outside_bytes_per_token=by_bytes[2],
        outside_bytes_per_microbatch=bytes_split[2], outside_bytes_per_step=bytes_split[3],
        outside_launches=launches[2] * t1 + launches_split[2], outside_launches_per_step=launches_split[3],
        syncs_per_microbatch=syncs_per_microbatch, syncs_per_step=results[l1, t1, 1].syncs - syncs_per_microbatch,
        optimizer_bytes_per_param=optimizer_cost.bytes / n_params,
        optimizer_launches=optimizer_cost.launches, optimizer_syncs=optimizer_cost.syncs,
        bytes_by_op={k: v for k, v in sorted(by_op.items(), key=lambda kv: -kv[1]) if abs(v) > 0.5},
        attn_bwd_over_fwd_flops=_per_call_ratio(results[l2, t2, 1]),
        runs=[(lay, t, k, results[lay, t, k]) for lay, t, k in sorted(results)])


def peer_measure(peer: str, cfg, tokens=(128, 256), layers=(1, 2)) -> Measurement:
    """The same measurement of a peer framework's model of the config's shape (``--peer torchtitan``)."""
    if peer not in BUILDERS or peer is None:
        raise ValueError(f"unknown peer {peer!r}: known are {', '.join(k for k in BUILDERS if k)}")
    return measure(cfg, tokens=tokens, layers=layers, peer=peer)
