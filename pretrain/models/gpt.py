"""Decoder-only GPT in two flavours, chosen by ``model.flavor``.

- ``llama``: RoPE (rotate-half), RMSNorm, SwiGLU, grouped-query attention (``n_kv_heads``), no biases,
  optionally tied embeddings (Touvron et al. 2023).
- ``gpt2``: learned positions, LayerNorm, GELU (tanh), biases, tied embeddings (Radford et al. 2019).

Shapes: B batch, T tokens, D model dim, H heads, K kv heads, E head dim, V vocab.
Parameter names: ``embed_tokens``, ``embed_positions``, ``layers.{i}.{input_layernorm, self_attn.{q,k,v,o}_proj,
post_attention_layernorm, mlp.{gate,up,down}_proj}``, ``norm``, ``lm_head`` — HF Llama's names without the
``model.`` prefix. With ``model.n_experts`` the MLPs after the first ``moe_dense_layers`` are MoE layers
(``models/moe.py``: ``mlp.gate``, ``mlp.experts.{gate_up_proj, down_proj}``, ``mlp.shared_experts``).
Pipeline stages delete ``layers`` entries or set ``embed_tokens`` / ``norm`` / ``lm_head`` to None.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import ModelConfig
from pretrain.models.layers import (
    MLP,
    Attention,
    Documents,
    LayerNorm,
    RMSNorm,
    Rotary,
    compute_dtype,
    init_weights,
)
from pretrain.models.moe import MoE
from pretrain.models.ops import Ops


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, ops: Ops, index: int = 0):
        super().__init__()
        llama = cfg.flavor == "llama"
        norm = RMSNorm if llama else LayerNorm
        self.input_layernorm = norm(cfg.d_model, cfg.norm_eps, ops)
        if cfg.mla:
            from pretrain.models.mla import LatentAttention

            self.self_attn = LatentAttention(cfg, ops)
        else:
            self.self_attn = Attention(cfg, ops, causal=True, bias=not llama)
        self.post_attention_layernorm = norm(cfg.d_model, cfg.norm_eps, ops)
        if cfg.n_experts and index >= cfg.moe_dense_layers:
            self.mlp = MoE(cfg, index)
        else:
            self.mlp = MLP(cfg, gated=llama, bias=not llama, gelu_approximate="tanh", ops=ops)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        # each residual add and the norm after it as one kernel (Triton norms): the attention's with
        # post_attention_layernorm, the MLP's with the next block's input_layernorm (or the final norm; see
        # ``GPT.hidden_states``). Tensor parallelism turns it off (its sequence-parallel norms take their input
        # through the module's forward)
        self.fused_add_norm = self.post_attention_layernorm.fused_add

    def forward(self, x, rotary=None, pending=None, defer: bool = False, documents: Documents | None = None):
        """x (B, T, D) -> x + attn + mlp. ``pending``: the previous block's MLP output, not yet added to ``x``
        (added here, in one kernel with this block's first norm); ``defer``: return (x + attn, mlp) and leave that
        add to the next block the same way; ``documents``: the batch's packed documents (``layers.Documents``)."""
        if pending is not None:
            x, h = self.input_layernorm.add(x, pending)
        else:
            h = self.input_layernorm(x)
        a = self.dropout(self.self_attn(compute_dtype(h), rotary, documents=documents))
        if self.fused_add_norm:
            x, h = self.post_attention_layernorm.add(x, a)
        else:
            x = x + a
            h = self.post_attention_layernorm(x)
        m = self.dropout(self.mlp(h if isinstance(self.mlp, MoE) else compute_dtype(h)))  # the router: fp32
        return (x, m) if defer else x + m


class MTPModule(nn.Module):
    """Multi-token prediction, one depth (DeepSeek-V3 §2.2; Megatron-core's layout): the previous depth's residual
    stream h (the main model's last block output for the first depth) and the embedding of the token k places ahead
    are each RMS-normed, concatenated (embedding first) and projected back to D by ``eh_proj``; one transformer
    block runs on that; its own final ``norm`` and the model's output head (shared, as the embedding) predict the
    token k + 1 places ahead. Hugging Face's DeepSeek-V3 / GLM-4.5 checkpoints store depth j as the layer after the
    last (``model.layers.{n_layers + j}``: ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm``, the block)."""

    def __init__(self, cfg: ModelConfig, ops: Ops, index: int):
        super().__init__()
        self.enorm = RMSNorm(cfg.d_model, cfg.norm_eps, ops)
        self.hnorm = RMSNorm(cfg.d_model, cfg.norm_eps, ops)
        self.eh_proj = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.block = Block(cfg, ops, index)
        self.block.fused_add_norm = False  # a block on its own: it adds its own residuals
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps, ops)

    def forward(self, h, embedded, rotary, documents):
        """(this depth's residual stream, its final norm): every parameter used inside the module's own forward
        (an FSDP unit of its own)."""
        x = self.eh_proj(torch.cat([self.enorm(embedded), self.hnorm(h)], dim=-1))
        x = self.block(x, rotary, documents=documents)
        return x, self.norm(x)


def shifted(values: torch.Tensor, k: int, fill) -> torch.Tensor:
    """``values`` (B, T) moved k places left, the last k filled with ``fill``."""
    out = torch.full_like(values, fill)
    out[:, :values.shape[1] - k] = values[:, k:]
    return out


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        ops = Ops(cfg.kernels)
        llama = cfg.flavor == "llama"
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_positions = None if llama else nn.Embedding(cfg.positions, cfg.d_model)
        self.rotary = Rotary(cfg.rotary_dim, cfg.rope_theta, cfg.seq_len, ops, cfg.rope_scaling) if llama else None
        self.ops = ops
        self.embed_dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.layers = nn.ModuleDict({str(i): Block(cfg, ops, i) for i in range(cfg.n_layers)})
        self.norm = (RMSNorm if llama else LayerNorm)(cfg.d_model, cfg.norm_eps, ops)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        # registered last: the main model's parameters draw the same initial values with or without MTP
        self.mtp = nn.ModuleList([MTPModule(cfg, ops, cfg.n_layers + j) for j in range(cfg.mtp_depth)]) \
            if cfg.mtp_depth else None
        self.init_weights()

    def init_weights(self) -> None:
        init_weights(self, self.cfg.init_std, self.cfg.n_layers)

    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    is_first_stage = True  # pipeline stages after the first take hidden states instead of tokens
    context = None  # context parallelism with MTP (parallel/context_parallel.py): this rank's chunks of the sequence

    def hidden_states(self, x: torch.Tensor, document_ids: torch.Tensor | None = None,
                      positions: torch.Tensor | None = None, branch_ids: torch.Tensor | None = None,
                      with_stream: bool = False) -> torch.Tensor:
        """tokens (B, T) int -> final-norm hidden states (B, T, D). A later pipeline stage takes hidden states
        (B, T, D) instead; one without ``norm`` returns the last block's output. ``document_ids`` (B, T) ints:
        packed documents, each attending only within itself (equal ids side by side form one document; None: one
        sequence a row); ``positions`` (B, T): the tokens' positions, restarting at each document
        (``data.reset_positions``; None: 0..T-1); ``branch_ids`` (B, T): scoring's prefix trees
        (``layers.Documents``). ``with_stream``: (final-norm hidden states, the residual stream before that norm)."""
        documents = Documents.of(document_ids, positions, branch_ids)
        if self.is_first_stage:
            tokens = x
            x = self.embed_tokens(tokens)  # (B, T, D)
            if self.embed_positions is not None:
                t = tokens.shape[1]
                if t > self.embed_positions.num_embeddings:
                    raise ValueError(f"sequence of {t} tokens exceeds the {self.embed_positions.num_embeddings} "
                                     "learned positions")
                if positions is None:  # (B, T): what tensor parallelism's plan shards over the sequence
                    positions = torch.arange(t, device=tokens.device).expand(tokens.shape[0], t)
                x = x + self.embed_positions(positions)
            x = self.embed_dropout(x)
            if not self.cfg.fp32_residual:  # the residual stream in the autocast dtype (bf16) from here on
                x = compute_dtype(x)
        layers = list(self.layers.values())
        if not (layers and layers[0].fused_add_norm):
            for layer in layers:
                x = layer(x, self.rotary, documents=documents)
            out = x if self.norm is None else self.norm(x)
            return (out, x) if with_stream else out
        pending = None  # each block's MLP output, added by the next block's first norm (one kernel)
        for layer in layers:
            x, pending = layer(x, self.rotary, pending, defer=True, documents=documents)
        if self.norm is None:  # a pipeline stage sends the whole residual stream
            return x + pending
        stream, out = self.norm.add(x, pending)
        return (out, stream) if with_stream else out

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, branch_ids: torch.Tensor | None = None,
                logits_at: torch.Tensor | None = None, mtp_targets: torch.Tensor | None = None):
        """tokens (B, T) -> logits (B, T, V) (a pipeline stage: see ``hidden_states``, which also describes
        ``document_ids``, ``positions`` and ``branch_ids``). With ``targets`` (B, T): the mean cross-entropy over the
        non-ignored targets instead, through ``ops.cross_entropy`` (the fused kernel never materialises the logits).
        ``logits_at`` (B, T) bool: the logits of those positions only, (N, V) in row-major order (scoring: the head
        and the softmax skip the context's positions). ``mtp_targets`` (B, T), the next-token targets, with
        ``model.mtp_depth``: (that output, [(summed cross-entropy, targets) of each MTP depth]) — ``mtp_losses``."""
        if mtp_targets is not None and self.mtp is not None:
            h, stream = self.hidden_states(x, document_ids, positions, branch_ids, with_stream=True)
            return self._head(h, targets, logits_at), self.mtp_losses(stream, mtp_targets, document_ids, positions)
        h = self.hidden_states(x, document_ids, positions, branch_ids)
        if self.norm is None:  # not the last pipeline stage
            return h
        return self._head(h, targets, logits_at)

    def _head(self, h, targets=None, logits_at=None):
        if logits_at is not None:
            h = h[logits_at]
        if targets is not None:
            return self.ops.cross_entropy(h.reshape(-1, h.shape[-1]), self.output_weight(), targets.reshape(-1))
        return self.lm_head(h) if self.lm_head is not None else F.linear(h, self.embed_tokens.weight)

    def mtp_losses(self, stream: torch.Tensor, targets: torch.Tensor, document_ids=None, positions=None
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(summed cross-entropy, count of targets)] of each depth k = 1..D: at position i, the block of depth k
        reads the previous depth's stream and the embedding of the token k places ahead (``targets[i + k - 1]``)
        and predicts ``targets[i + k]``; positions whose chain leaves the row, meets an ignored target or crosses
        into another packed document are not scored. Under context parallelism ``targets`` (and the document ids)
        are the whole sequence's, the stream this rank's chunks: the shifts cross the chunks, then each depth takes
        this rank's chunks (``split_sequence``)."""
        documents = Documents.of(document_ids, positions)
        ignore = -100
        out = []
        h = stream
        for k, module in enumerate(self.mtp, 1):
            ahead = shifted(targets, k - 1, ignore)  # the token k places ahead of position i
            wanted = shifted(targets, k, ignore)
            valid = (ahead != ignore) & (wanted != ignore)
            if document_ids is not None:
                valid &= shifted(document_ids, k, -1) == document_ids
            wanted = torch.where(valid, wanted, ignore)
            if self.context is not None:
                from pretrain.parallel.context_parallel import split_sequence

                ahead, wanted = (split_sequence(x, self.context.cp, self.context.rank) for x in (ahead, wanted))
                valid = wanted != ignore
            # (under sequence parallelism the embedding returns this rank's part of the sequence, as the stream's)
            h, normed = module(h, self.embed_tokens(ahead.clamp(min=0)), self.rotary, documents)
            count = valid.sum()
            if "cross_entropy" in self.ops.triton:  # the fused head + loss: its mean over the kept targets
                loss = self.ops.cross_entropy(normed.reshape(-1, normed.shape[-1]), self.output_weight(),
                                              wanted.reshape(-1)) * count
            else:
                logits = self._head(normed)
                flat = logits.reshape(-1, logits.shape[-1])
                loss = F.cross_entropy(flat.float() if flat.element_size() < 4 else flat, wanted.reshape(-1),
                                       ignore_index=ignore, reduction="sum")
            out.append((loss, count))
        return out

    @torch.no_grad()
    def generate(
        self,
        tokens: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        eos_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend ``tokens`` (B, T) by up to ``max_new_tokens``: greedy when temperature is 0, else sampled
        from softmax(logits / temperature) restricted to the ``top_k`` most likely tokens (0 or None: all)."""
        was_training = self.training
        self.eval()
        window = self.embed_positions.num_embeddings if self.embed_positions is not None else None
        finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        for _ in range(max_new_tokens):
            context = tokens if window is None else tokens[:, -window:]
            logits = self(context)[:, -1, :].float()  # (B, V)
            if temperature <= 0:
                next_token = logits.argmax(dim=-1)
            else:
                logits = logits / temperature
                if top_k and top_k < logits.shape[-1]:  # None or 0: every token
                    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                next_token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            if eos_id is not None:
                next_token = torch.where(finished, torch.full_like(next_token, eos_id), next_token)
                finished |= next_token == eos_id
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            if eos_id is not None and bool(finished.all()):
                break
        self.train(was_training)
        return tokens
