"""Run under torchrun (2 or 4 ranks; the harness runs ``checks`` inside its launches): context-parallel attention (ring, all-to-all) against one process's causal
attention over the whole sequence — outputs and the gradients of q, k, v — and print one line per case:
``CPATTN impl heads/kv_heads T out_diff grad_diff``. Exit status 1 if any differs by more than 1e-5."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pretrain.parallel.context_parallel import ContextParallel, split_sequence  # noqa: E402


def sdpa(q, k, v, causal=True, document_ids=None):
    if document_ids is not None:  # the all-to-all's attention over the whole sequence, with documents
        from pretrain.models.ops import torch_attention

        return torch_attention(q, k, v, causal=causal, document_ids=document_ids)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def documents(t: int) -> torch.Tensor:
    """(2, T) document ids: documents of 1 to 37 tokens, crossing the chunk borders, row 2 shifted."""
    rows = []
    for shift in (0, 5):
        lengths, ids, doc = [1, 13, 37, 3, 22, 9], [], 0
        while len(ids) < t + shift:
            ids += [doc] * lengths[doc % len(lengths)]
            doc += 1
        rows.append(ids[shift:shift + t])
    return torch.tensor(rows)


def case(impl: str, heads: int, kv_heads: int, t: int, cp: ContextParallel, docs: bool = False) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(heads * 100 + kv_heads * 10 + t)
    q = torch.randn(2, heads, t, 8, generator=gen, requires_grad=True)
    k = torch.randn(2, kv_heads, t, 8, generator=gen, requires_grad=True)
    v = torch.randn(2, kv_heads, t, 8, generator=gen, requires_grad=True)
    w = torch.randn(2, heads, t, 8, generator=gen)
    ids = documents(t) if docs else None
    if docs:
        from pretrain.kernels.reference import attention as reference

        ref = reference(q, k, v, causal=True, document_ids=ids)
    else:
        ref = sdpa(q, k, v)
    (ref * w).sum().backward()
    local = [split_sequence(x.detach(), cp.cp, cp.rank, dim=2).requires_grad_() for x in (q, k, v)]
    out = cp(*local, document_ids=ids)
    (out * split_sequence(w, cp.cp, cp.rank, dim=2)).sum().backward()
    out_diff = (out - split_sequence(ref.detach(), cp.cp, cp.rank, dim=2)).abs().max().item()
    grad_diff = max((x.grad - split_sequence(full.grad, cp.cp, cp.rank, dim=2)).abs().max().item()
                    for x, full in zip(local, (q, k, v)))
    return out_diff, grad_diff


def checks() -> bool:
    """Every case on this launch's ranks (the process group exists); returns whether one failed. The Triton
    blocks (interpreted on CPU) run at 2 ranks only: cp = 2 already has every kind of sub-block — diagonal, whole,
    skipped — and at 4 ranks on 2 cores they cost more than the rest of the launch."""
    rank, world = dist.get_rank(), dist.get_world_size()
    failed = False
    variants = [("ring", "torch"), ("alltoall", "torch")]
    if os.environ.get("TRITON_INTERPRET") == "1" and importlib.util.find_spec("triton") and world == 2:
        variants.append(("ring", "triton"))  # the ring's blocks through our Triton attention (interpreted)
    for impl, blocks in variants:
        cp = ContextParallel(dist.group.WORLD, world, rank, impl, attention=sdpa, blocks=blocks)
        # the last case packs documents (data.document_mask): chunks of 16 tokens, documents across their borders
        for heads, kv_heads, t, docs in ((4, 4, 8 * world, False), (4, 2, 6 * world, False), (8, 1, 4 * world, False),
                                         (4, 2, 32 * world, True)):
            out_diff, grad_diff = case(impl, heads, kv_heads, t, cp, docs)
            ok = out_diff <= 1e-5 and grad_diff <= 1e-5
            failed |= not ok
            if rank == 0:
                print(f"CPATTN {impl}/{blocks} {heads}/{kv_heads} T={t}{' documents' if docs else ''} "
                      f"{'ok' if ok else 'FAILED'} out_diff={out_diff:.2e} grad_diff={grad_diff:.2e}", flush=True)
    dist.barrier()
    return failed


def main() -> int:
    dist.init_process_group("gloo")
    failed = checks()
    dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
