"""Fused AdamW (Loshchilov & Hutter 2019): the whole update of a tensor in one kernel, fp32 math and state.

Per element, with bias corrections c1 = 1 - β1^t, c2 = 1 - β2^t:
    p ← p·(1 - lr·wd);  m ← β1·m + (1-β1)·g;  v ← β2·v + (1-β2)·g²;  p ← p - (lr/c1) · m / (sqrt(v)/sqrt(c2) + ε)
exactly ``torch.optim.AdamW``'s arithmetic, in one pass over p, g, m, v (16 bytes read + 12 written per fp32
element, vs several passes unfused). Multi-tensor: one launch per parameter group and dtype, whatever the
number of tensors — each program finds its tensor through tables of data pointers and block offsets, and
each tensor keeps its own step count (bias correction). The pointer and block tables are built once and kept
on the device while the storages behind them stay where they are (a changed address rebuilds them), and
when every tensor of a launch has the same step count — the usual case — the bias corrections are scalar
arguments: a step then copies nothing from host to device. Parameters may be fp32, or bf16/fp16
with ``master_weights=True`` keeping an fp32 copy in the state that the update is applied to. The state dict
(``step``, ``exp_avg``, ``exp_avg_sq`` per parameter; group hyper-parameters) loads into and from
``torch.optim.AdamW``.

Sharded parameters (FSDP2, TP, EP: DTensors) are updated through their local shards: a DTensor's own
``data_ptr()`` is 0, so every address in the tables is taken from ``to_local()`` of the parameter, its gradient and
its state (which stays a DTensor of the parameter's layout, as ``torch.optim.AdamW`` keeps it, so distributed
checkpoints shard it alike). A rank whose shard is empty (uneven FSDP splits) launches nothing for it.
"""

from __future__ import annotations

import math

import torch

from pretrain.kernels._common import check_device, require_triton

require_triton()
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

BLOCK = 1024
ELEMENT = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _pointer(TABLE, t, KIND: tl.constexpr):
    address = tl.load(TABLE + t)
    if KIND == 1:
        return address.to(tl.pointer_type(tl.bfloat16))
    elif KIND == 2:
        return address.to(tl.pointer_type(tl.float16))
    else:
        return address.to(tl.pointer_type(tl.float32))


@triton.jit
def _adamw_multi_kernel(P_PTRS, G_PTRS, M_PTRS, V_PTRS, MASTER_PTRS, TENSOR_OF_BLOCK, BLOCK_START, SIZES,
                        STEP_SIZE, INV_SQRT_C2, step_size, inv_sqrt_c2, lr, beta1, beta2, eps, weight_decay,
                        P_KIND: tl.constexpr, G_KIND: tl.constexpr, HAS_MASTER: tl.constexpr,
                        PER_TENSOR_STEP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(TENSOR_OF_BLOCK + pid)
    offsets = tl.load(BLOCK_START + pid) + tl.arange(0, BLOCK)
    inside = offsets < tl.load(SIZES + t)
    p_ptr = _pointer(P_PTRS, t, P_KIND)
    g_ptr = _pointer(G_PTRS, t, G_KIND)
    m_ptr = _pointer(M_PTRS, t, 0)
    v_ptr = _pointer(V_PTRS, t, 0)
    if HAS_MASTER:
        master_ptr = _pointer(MASTER_PTRS, t, 0)
        p = tl.load(master_ptr + offsets, mask=inside, other=0.0)
    else:
        p = tl.load(p_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + offsets, mask=inside, other=0.0)
    v = tl.load(v_ptr + offsets, mask=inside, other=0.0)
    p = p * (1.0 - lr * weight_decay)
    m = m + (1.0 - beta1) * (g - m)  # lerp, as torch: m·β1 + g·(1-β1)
    v = v * beta2 + (1.0 - beta2) * g * g
    if PER_TENSOR_STEP:
        step_size = tl.load(STEP_SIZE + t)
        inv_sqrt_c2 = tl.load(INV_SQRT_C2 + t)
    p = p - step_size * m / (tl.sqrt(v) * inv_sqrt_c2 + eps)
    tl.store(m_ptr + offsets, m, mask=inside)
    tl.store(v_ptr + offsets, v, mask=inside)
    if HAS_MASTER:
        tl.store(master_ptr + offsets, p, mask=inside)
    tl.store(p_ptr + offsets, p.to(p_ptr.dtype.element_ty), mask=inside)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard (same storage), any other tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def step_cost(optimizer: FusedAdamW) -> tuple[int, int]:
    """(bytes, launches) of one ``step()`` (the step-cost meter cannot see a raw launch): per element the kernel
    reads p, g, m, v (and the master copy) and writes p, m, v (and the master); one launch per bucket."""
    moved, buckets = 0, set()
    for i, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            if p.grad is None:
                continue
            shard, grad = local(p), local(p.grad)
            master = optimizer.master_weights and p.dtype != torch.float32
            per_element = 2 * shard.element_size() + grad.element_size() + 16 + (8 if master else 0)
            moved += shard.numel() * per_element
            buckets.add((i, shard.dtype, grad.dtype, master))
    return moved, len(buckets)


class FusedAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 master_weights: bool = False):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW hyper-parameters: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "amsgrad": False,
                    "maximize": False, "foreach": None, "capturable": False, "differentiable": False,
                    "fused": None, "decoupled_weight_decay": True}
        super().__init__(params, defaults)
        self.master_weights = master_weights
        self._tables: dict[tuple, tuple] = {}  # launch -> (addresses it was built for, device tables)
        self.table_builds = 0  # how many times tables were copied to the device (tests, benchmarks)

    def _init_state(self, p):
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
        if self.master_weights and p.dtype != torch.float32 and "master_param" not in state:
            state["master_param"] = p.detach().float().contiguous()
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict[tuple, list] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._init_state(p)
                shard = self._shard(p, state)
                state["step"] += 1
                if shard[0].numel() == 0:  # nothing of this tensor on this rank
                    continue
                buckets.setdefault((shard[0].device, shard[0].dtype, shard[1].dtype, shard[4] is not None),
                                   []).append((id(p), shard, float(state["step"])))
            for (device, p_dtype, g_dtype, has_master), shards in buckets.items():
                self._launch(group, shards, device, p_dtype, g_dtype, has_master)
        return loss

    def _shard(self, p, state) -> tuple:
        """(param, grad, exp_avg, exp_avg_sq, master or None): this rank's part of each, checked for the kernel."""
        grad = p.grad
        if getattr(grad, "placements", None) is not None and grad.placements != p.placements:
            # e.g. TP's vocab-parallel embedding: DTensor's embedding backward returns its gradient Replicate
            # while the weight is Shard(0); torch's AdamW redistributes it implicitly, the kernel needs it alike
            grad = grad.redistribute(p.device_mesh, p.placements)
        shard = (local(p), local(grad), local(state["exp_avg"]), local(state["exp_avg_sq"]),
                 local(state["master_param"]) if "master_param" in state else None)
        param, grad = shard[0], shard[1]
        if grad.is_sparse:
            raise RuntimeError("FusedAdamW does not take sparse gradients")
        check_device(param, grad)
        if param.shape != grad.shape:
            raise ValueError(f"FusedAdamW: a parameter shard {tuple(param.shape)} and its gradient shard "
                             f"{tuple(grad.shape)} differ (a parameter and its gradient sharded differently)")
        if not all(t.is_contiguous() for t in shard if t is not None):
            raise ValueError(f"FusedAdamW needs contiguous parameters and gradients, got strides {param.stride()}")
        if param.dtype not in ELEMENT or grad.dtype not in ELEMENT:
            raise TypeError(f"unsupported parameter dtype {param.dtype}: the kernels take float32, float16 or "
                            "bfloat16")
        if param.dtype != torch.float32 and not self.master_weights:
            raise TypeError(f"{param.dtype} parameters need master_weights=True (an fp32 copy to update)")
        return shard

    def _pointer_tables(self, key, shards, device):
        """Device tables of the bucket's addresses, block map and sizes; rebuilt only when an address moved."""
        addresses = tuple(tuple(t.data_ptr() if t is not None else 0 for t in shard) + (shard[0].numel(),)
                          for shard in shards)
        cached = self._tables.get(key)
        if cached is not None and cached[0] == addresses:
            return cached[1]
        blocks = [(i, start) for i, shard in enumerate(shards) for start in range(0, shard[0].numel(), BLOCK)]

        def table(values, dtype):
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        tables = (*(table([a[j] for a in addresses], torch.int64) for j in range(5)),
                  table([b[0] for b in blocks], torch.int32), table([b[1] for b in blocks], torch.int32),
                  table([a[5] for a in addresses], torch.int64))
        self._tables[key] = (addresses, tables)
        self.table_builds += 1
        return tables

    def _launch(self, group, shards, device, p_dtype, g_dtype, has_master):
        """One kernel for every tensor of the bucket: pointer tables, block -> tensor map, per-tensor steps."""
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        steps = [step for _, _, step in shards]
        key = (device, tuple(param_id for param_id, _, _ in shards))
        tables = self._pointer_tables(key, [shard for _, shard, _ in shards], device)
        n_blocks = tables[5].numel()
        uniform = len(set(steps)) == 1
        step_sizes = [lr / (1 - beta1 ** t) for t in steps]
        inv_sqrt_c2 = [1.0 / math.sqrt(1 - beta2 ** t) for t in steps]
        if uniform:
            per_tensor = (tables[0], tables[0])  # unused pointers
        else:
            per_tensor = (torch.tensor(step_sizes, dtype=torch.float32).to(device, non_blocking=True),
                          torch.tensor(inv_sqrt_c2, dtype=torch.float32).to(device, non_blocking=True))
        _adamw_multi_kernel[(n_blocks,)](*tables, *per_tensor, step_sizes[0], inv_sqrt_c2[0], lr, beta1, beta2, eps,
                                         wd, P_KIND=ELEMENT[p_dtype], G_KIND=ELEMENT[g_dtype], HAS_MASTER=has_master,
                                         PER_TENSOR_STEP=not uniform, BLOCK=BLOCK)
