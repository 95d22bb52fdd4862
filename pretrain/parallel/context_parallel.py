"""Context parallelism: one sequence split over the ``cp`` ranks of the mesh, attention computed across them.

Load balancing (Megatron's zigzag): the sequence of T tokens is cut into 2·cp chunks of c = T / (2·cp); cp rank r
holds chunks r and 2·cp − 1 − r (so every rank has as much causal work as any other), its tokens, targets and
RoPE positions alike. Everything but attention is token-wise and runs on the local T / cp tokens unchanged.

Attention, ``parallel.cp_impl``:

- ``ring`` (Liu et al. 2023, ring attention): the K/V blocks travel around the cp ranks; each rank attends its
  queries to every block that reaches it and merges the partial outputs by their log-sum-exp. Backward recomputes
  each block's probabilities from the saved log-sum-exp (FlashAttention's backward) and sends dK/dV around the
  ring with the block, so that after cp steps every rank holds the whole gradient of its own K/V. A block's
  sub-blocks that the causal mask hides entirely are not computed, but every rank makes exactly the same sends
  and receives at every step whatever it computes: a rank that skipped one would leave its neighbour waiting.
  The forward's next exchange is in flight while the current block is computed.
- ``alltoall`` (DeepSpeed-Ulysses, Jacobs et al. 2023): two all-to-alls turn (all heads, T/cp tokens) into
  (H/cp heads, all T tokens) and back; attention in between is ordinary causal attention over the whole sequence
  (the model's own ``ops.attention``, SDPA or our Triton kernel). cp must divide the heads; when it does not
  divide the kv heads, K and V are repeated to the query heads first (GQA's memory saving is then lost inside
  attention only).

Packed documents (``data.document_mask``): every cp rank holds the whole batch's document ids (they are not
split), so both implementations know every chunk's documents without sending them. The ring masks each pair of
chunks by document — a query sees a key of another rank's chunk only within its own document —, and with the
Triton attention a pair's key blocks wholly in other documents are skipped inside the kernel (a pair with no
document in common costs a launch and no FLOPs); the exchanges stay the same on every rank. All-to-all hands the
whole sequence's ids to the attention it runs over the whole sequence.

Both are plain autograd code over ``torch.distributed`` (gloo and NCCL alike). The ring computes each block with
the model's attention backend: with the Triton attention (``model.kernels``) its fused forward, which returns the
log-sum-exp, and its backward given the merged output and log-sum-exp (exactly FlashAttention's block
decomposition); with torch, in fp32 matmuls (the portable reference: (T / 2cp)² scores per head at a time).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def chunks_of(rank: int, cp: int) -> tuple[int, int]:
    return rank, 2 * cp - 1 - rank


def local_positions(t_local: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Global positions (t_local,) of the tokens cp rank ``rank`` holds: its two chunks, in order."""
    c = t_local // 2
    a, b = chunks_of(rank, cp)
    return torch.cat([torch.arange(a * c, (a + 1) * c, device=device), torch.arange(b * c, (b + 1) * c, device=device)])


def split_sequence(x: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's two chunks of ``x`` along ``dim`` (length divisible by 2·cp)."""
    parts = x.chunk(2 * cp, dim=dim)
    a, b = chunks_of(rank, cp)
    return torch.cat([parts[a], parts[b]], dim=dim)


class ContextParallel:
    """What an attention layer needs under context parallelism: the cp group, this rank's place in it, the
    implementation. Called like ``ops.attention`` on local q (B, H, T/cp, E), k, v (B, K, T/cp, E)."""

    def __init__(self, group, cp: int, rank: int, impl: str, attention=None, blocks: str = "torch"):
        self.group, self.cp, self.rank, self.impl, self.attention = group, cp, rank, impl, attention
        self.blocks = TritonBlocks() if blocks == "triton" else TorchBlocks()
        self.ranks = [dist.get_global_rank(group, i) for i in range(cp)] if group is not None else list(range(cp))

    def positions(self, t_local: int, device=None) -> torch.Tensor:
        return local_positions(t_local, self.cp, self.rank, device)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, document_ids=None) -> torch.Tensor:
        """``document_ids``: the whole batch's (B, T) ids (packed documents), or None."""
        if self.impl == "ring":
            from pretrain.kernels.reference import batch_document_bounds

            return RingAttention.apply(q, k, v, self, None if document_ids is None else
                                       batch_document_bounds(document_ids))
        return ulysses_attention(q, k, v, self, document_ids)


class _Docs:
    """One chunk pair's document bounds: the query chunk's and the key chunk's (2, B, c) slices of the whole
    batch's, and their global offsets."""

    def __init__(self, bounds: torch.Tensor, q_chunk: int, k_chunk: int, c: int):
        self.q0, self.k0 = q_chunk * c, k_chunk * c
        self.q = bounds[:, :, self.q0:self.q0 + c].contiguous()
        self.k = self.q if k_chunk == q_chunk else bounds[:, :, self.k0:self.k0 + c].contiguous()

    def mask(self) -> torch.Tensor:
        """(B, 1, c, c): query i and key j in one document."""
        return self.q[0][:, None, :, None] == self.k[0][:, None, None, :]


# --- ring ---------------------------------------------------------------------------------------------------
def _relation(q_chunk: int, k_chunk: int) -> str:
    return "full" if k_chunk < q_chunk else "diagonal" if k_chunk == q_chunk else "none"


def _visible(cp: ContextParallel, source: int, c: int, bounds: torch.Tensor | None = None):
    """(rows, cols, relation, docs) of this rank's query chunks against ``source``'s key chunks that the causal
    mask does not hide entirely (rows / cols: slices of the local (2·c)-token tensors; docs: the pair's document
    bounds, or None)."""
    for i, qc in enumerate(chunks_of(cp.rank, cp.cp)):
        for j, kc in enumerate(chunks_of(source, cp.cp)):
            relation = _relation(qc, kc)
            if relation != "none":
                docs = None if bounds is None else _Docs(bounds, qc, kc, c)
                yield slice(i * c, (i + 1) * c), slice(j * c, (j + 1) * c), relation, docs


def _scores(q, k, scale, relation, docs=None):
    """fp32 scores (B, H, c, c) of one query chunk against one key chunk, causally masked on the diagonal and, with
    documents, by document."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if relation == "diagonal":
        c = s.shape[-1]
        s = s.masked_fill(torch.ones(c, c, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    if docs is not None:
        s = s.masked_fill(~docs.mask(), float("-inf"))
    return s


NEG_LSE = -1.0e30  # the log-sum-exp of a row that sees no key of a block (the Triton kernel's finite -inf)


def _expand(kv: torch.Tensor, groups: int) -> torch.Tensor:
    return kv if groups == 1 else kv.repeat_interleave(groups, dim=1)


class TorchBlocks:
    """One query chunk against one key chunk in fp32 matmuls: forward -> (out fp32, lse); backward from the merged
    output and log-sum-exp -> (dq, dk, dv) of this block (dk, dv summed over the query heads sharing a kv head)."""

    @staticmethod
    def forward(q, k, v, relation, docs=None):
        h, kv_heads = q.shape[1], k.shape[1]
        s = _scores(q.float(), _expand(k.float(), h // kv_heads), 1.0 / math.sqrt(q.shape[-1]), relation, docs)
        lse = torch.logsumexp(s, dim=-1).clamp_min(NEG_LSE)  # a row with no key here: weight 0 in the merge
        return torch.matmul(torch.exp(s - lse[..., None]), _expand(v.float(), h // kv_heads)), lse

    @staticmethod
    def backward(q, k, v, out, lse, dout, relation, docs=None):
        b, h, c, e = q.shape
        kv_heads = k.shape[1]
        groups, scale = h // kv_heads, 1.0 / math.sqrt(e)
        qf, do = q.float(), dout.float()
        kb, vb = _expand(k.float(), groups), _expand(v.float(), groups)
        p = torch.exp(_scores(qf, kb, scale, relation, docs) - lse[..., None])
        dv = torch.matmul(p.transpose(-1, -2), do)
        ds = p * (torch.matmul(do, vb.transpose(-1, -2)) - (do * out.float()).sum(-1, keepdim=True))
        dq = torch.matmul(ds, kb) * scale
        dk = torch.matmul(ds.transpose(-1, -2), qf) * scale
        if groups > 1:
            dk = dk.view(b, kv_heads, groups, -1, e).sum(2)
            dv = dv.view(b, kv_heads, groups, -1, e).sum(2)
        return dq, dk, dv


class TritonBlocks:
    """The same through our Triton attention (``kernels/attention.py``): its forward returns the log-sum-exp, its
    backward takes the output and log-sum-exp it should differentiate against — here the merged ones."""

    @staticmethod
    def _mask(q):
        return q.new_zeros(1, dtype=torch.int8)

    @staticmethod
    def _docs(docs):
        return {} if docs is None else {"docs": docs.q, "kdocs": docs.k, "q0": docs.q0, "k0": docs.k0}

    @staticmethod
    def forward(q, k, v, relation, docs=None):
        from pretrain.kernels.attention import attention_fwd

        out, lse = attention_fwd(q, k, v, TritonBlocks._mask(q), relation == "diagonal", False,
                                 1.0 / math.sqrt(q.shape[-1]), **TritonBlocks._docs(docs))
        return out.float(), lse

    @staticmethod
    def backward(q, k, v, out, lse, dout, relation, docs=None):
        from pretrain.kernels.attention import attention_bwd, backward_kind

        dq, dk, dv = attention_bwd(q, k, v, out.to(q.dtype), lse.contiguous(), TritonBlocks._mask(q),
                                   dout.to(q.dtype), relation == "diagonal", False, 1.0 / math.sqrt(q.shape[-1]),
                                   backward_kind() == "one_pass", **TritonBlocks._docs(docs))
        return dq.float(), dk.float(), dv.float()


class _Exchange:
    """One step of the ring: send ``tensor`` to the next cp rank, receive the previous rank's into a new buffer."""

    def __init__(self, ctx: ContextParallel, tensor: torch.Tensor):
        nxt = ctx.ranks[(ctx.rank + 1) % ctx.cp]
        prev = ctx.ranks[(ctx.rank - 1) % ctx.cp]
        self.received = torch.empty_like(tensor)
        ops = [dist.P2POp(dist.isend, tensor, nxt, ctx.group), dist.P2POp(dist.irecv, self.received, prev, ctx.group)]
        self.requests = dist.batch_isend_irecv(ops)

    def wait(self) -> torch.Tensor:
        for request in self.requests:
            request.wait()
        return self.received


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cp: ContextParallel, bounds: torch.Tensor | None = None):
        b, h, t, e = q.shape
        kv_heads, c = k.shape[1], t // 2
        out = torch.zeros(b, h, t, e, dtype=torch.float32, device=q.device)
        lse = torch.full((b, h, t), float("-inf"), dtype=torch.float32, device=q.device)
        block = torch.cat([k, v], dim=1).contiguous()  # (B, 2K, T/cp, E): one message a step
        for step in range(cp.cp):
            exchange = _Exchange(cp, block) if step < cp.cp - 1 else None  # in flight during the compute
            for rows, cols, relation, docs in _visible(cp, (cp.rank - step) % cp.cp, c, bounds):
                part, part_lse = cp.blocks.forward(q[:, :, rows], block[:, :kv_heads, cols],
                                                   block[:, kv_heads:, cols], relation, docs)
                new_lse = torch.logaddexp(lse[:, :, rows], part_lse)
                out[:, :, rows] = (out[:, :, rows] * torch.exp(lse[:, :, rows] - new_lse)[..., None]
                                   + part * torch.exp(part_lse - new_lse)[..., None])
                lse[:, :, rows] = new_lse
            if exchange is not None:
                block = exchange.wait()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cp, ctx.bounds = cp, bounds
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        cp = ctx.cp
        kv_heads, c = k.shape[1], q.shape[2] // 2
        dq = torch.zeros_like(q, dtype=torch.float32)
        block = torch.cat([k, v], dim=1)  # travels with its gradient accumulator
        grad = torch.zeros_like(block, dtype=torch.float32)
        for step in range(cp.cp):
            for rows, cols, relation, docs in _visible(cp, (cp.rank - step) % cp.cp, c, ctx.bounds):
                dq_b, dk_b, dv_b = cp.blocks.backward(q[:, :, rows], block[:, :kv_heads, cols],
                                                      block[:, kv_heads:, cols], out[:, :, rows], lse[:, :, rows],
                                                      dout[:, :, rows], relation, docs)
                dq[:, :, rows] += dq_b
                grad[:, :kv_heads, cols] += dk_b
                grad[:, kv_heads:, cols] += dv_b
            # every step, every rank: the block and its accumulated gradient move on; after the last step each
            # rank receives its own block with the contributions of every rank
            message = _Exchange(cp, torch.cat([block.to(grad.dtype), grad], dim=1).contiguous()).wait()
            block, grad = message[:, :2 * kv_heads].to(k.dtype), message[:, 2 * kv_heads:]
        dk, dv = grad[:, :kv_heads], grad[:, kv_heads:]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


# --- all-to-all (Ulysses) -----------------------------------------------------------------------------------
def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    return all_to_all_single_autograd(x.contiguous(), None, None, group)


def ulysses_attention(q, k, v, cp: ContextParallel, document_ids=None) -> torch.Tensor:
    b, h, t, e = q.shape
    n = cp.cp
    if k.shape[1] % n:  # GQA with fewer kv heads than cp ranks: repeat them to the query heads
        k, v = _expand(k, h // k.shape[1]), _expand(v, h // k.shape[1])
    positions = torch.cat([local_positions(t, n, r, q.device) for r in range(n)])  # by source rank
    order = torch.argsort(positions)  # -> natural order of the whole sequence

    def to_heads(x):  # (B, N, T/cp, E) -> (B, N/cp, T, E)
        heads = x.shape[1]
        x = x.reshape(b, n, heads // n, t, e).transpose(0, 1)  # (cp, B, N/cp, T/cp, E): head group g to rank g
        y = _all_to_all(x, cp.group).view(n, b, heads // n, t, e)  # dim 0: the source rank
        return y.permute(1, 2, 0, 3, 4).reshape(b, heads // n, n * t, e)[:, :, order]

    extra = {} if document_ids is None else {"document_ids": document_ids}  # the whole sequence's, in order
    y = cp.attention(to_heads(q), to_heads(k), to_heads(v), causal=True, **extra)  # (B, H/cp, T, E)
    y = y[:, :, torch.argsort(order)].reshape(b, h // n, n, t, e).permute(2, 0, 1, 3, 4)  # (cp, B, H/cp, T/cp, E)
    y = _all_to_all(y, cp.group).view(n, b, h // n, t, e)  # dim 0: the head group
    return y.transpose(0, 1).reshape(b, h, t, e)


def apply_context_parallel(model, cp_mesh, impl: str) -> None:
    """Every attention layer of ``model`` (whole or one pipeline stage) attends across the cp ranks."""
    from pretrain.models.layers import Attention
    from pretrain.models.mla import LatentAttention

    for module in model.modules():
        if isinstance(module, (Attention, LatentAttention)):  # MLA: v padded to the q/k head dim (models/mla.py)
            blocks = "triton" if "attention" in getattr(module.ops, "triton", ()) else "torch"
            module.context = ContextParallel(cp_mesh.get_group(), cp_mesh.size(), cp_mesh.get_local_rank(), impl,
                                             attention=module.ops.attention, blocks=blocks)
    if getattr(model, "mtp", None) is not None:  # multi-token prediction shifts the whole sequence's targets
        model.context = ContextParallel(cp_mesh.get_group(), cp_mesh.size(), cp_mesh.get_local_rank(), impl)
