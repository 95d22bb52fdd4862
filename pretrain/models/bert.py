"""BERT encoder with a masked-LM head (and an optional next-sentence head), post-LN as in Devlin et al. 2019.

Shapes: B batch, T tokens, D model dim, H heads, E head dim, V vocab.
Names: ``embeddings.{word_embeddings, position_embeddings, token_type_embeddings, norm}``,
``layers.{i}.{self_attn.{q,k,v,o}_proj, attn_norm, mlp.{up,down}_proj, mlp_norm}``,
``mlm_head.{dense, norm, bias}`` (decoder tied to the word embeddings), ``pooler``, ``nsp_head``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.config import ModelConfig
from pretrain.models.layers import MLP, Attention, Documents, LayerNorm, init_weights
from pretrain.models.ops import Ops


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position_embeddings = nn.Embedding(cfg.positions, cfg.d_model)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.norm = LayerNorm(cfg.d_model, cfg.norm_eps, ops)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()

    def forward(self, tokens, token_type_ids=None, positions=None):
        t = tokens.shape[1]
        if t > self.position_embeddings.num_embeddings:
            raise ValueError(f"sequence of {t} tokens exceeds the {self.position_embeddings.num_embeddings} learned positions")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(tokens)
        x = self.word_embeddings(tokens) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(torch.arange(t, device=tokens.device) if positions is None
                                         else positions)  # (B, T, D)
        return self.dropout(self.norm(x))


class EncoderLayer(nn.Module):
    """Post-LN: x = norm(x + attn(x)); x = norm(x + mlp(x))."""

    def __init__(self, cfg: ModelConfig, ops: Ops):
        super().__init__()
        self.self_attn = Attention(cfg, ops, causal=False, bias=True)
        self.attn_norm = LayerNorm(cfg.d_model, cfg.norm_eps, ops)
        self.mlp = MLP(cfg, gated=False, bias=True)
        self.mlp_norm = LayerNorm(cfg.d_model, cfg.norm_eps, ops)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.fused_add_norm = self.attn_norm.fused_add  # as the GPT block's (off under tensor parallelism)

    def forward(self, x, key_padding_mask=None, documents: Documents | None = None):
        a = self.dropout(self.self_attn(x, key_padding_mask=key_padding_mask, documents=documents))
        if self.fused_add_norm:  # post-LN: only the normed sum goes on
            x = self.attn_norm.add(x, a)[1]
            return self.mlp_norm.add(x, self.dropout(self.mlp(x)))[1]
        x = self.attn_norm(x + a)
        return self.mlp_norm(x + self.dropout(self.mlp(x)))


class MLMHead(nn.Module):
    def __init__(self, cfg: ModelConfig, ops: Ops):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.norm = LayerNorm(cfg.d_model, cfg.norm_eps, ops)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, x, decoder_weight):
        x = self.norm(F.gelu(self.dense(x)))
        return F.linear(x, decoder_weight, self.bias)  # (B, T, V)


class BERT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        ops = Ops(cfg.kernels)
        self.embeddings = Embeddings(cfg, ops)
        self.layers = nn.ModuleDict({str(i): EncoderLayer(cfg, ops) for i in range(cfg.n_layers)})
        self.mlm_head = MLMHead(cfg, ops)
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model) if cfg.nsp_head else None
        self.nsp_head = nn.Linear(cfg.d_model, 2) if cfg.nsp_head else None
        self.init_weights()

    is_first_stage = True  # pipeline stages after the first take hidden states instead of tokens

    def init_weights(self) -> None:
        init_weights(self, self.cfg.init_std, self.cfg.n_layers)
        if self.mlm_head is not None:
            nn.init.zeros_(self.mlm_head.bias)

    def encode(self, tokens, attention_mask=None, token_type_ids=None, document_ids=None, positions=None):
        """tokens (B, T), attention_mask (B, T) bool/int, 1 = real token -> hidden states (B, T, D). A later
        pipeline stage takes hidden states (B, T, D) in place of tokens. ``document_ids`` (B, T) ints: packed
        documents, each attending only within itself; ``positions`` (B, T): positions restarting with them."""
        mask = None if attention_mask is None else attention_mask.bool()
        documents = Documents.of(document_ids, positions)
        x = self.embeddings(tokens, token_type_ids, positions) if self.is_first_stage else tokens
        for layer in self.layers.values():
            x = layer(x, key_padding_mask=mask, documents=documents)
        return x

    def forward(self, tokens, attention_mask=None, token_type_ids=None, with_nsp: bool = False, document_ids=None,
                positions=None):
        """-> MLM logits (B, T, V); with ``with_nsp``, (MLM logits, NSP logits (B, 2)). A pipeline stage without
        the head returns (hidden states, attention mask) for the next one. ``document_ids``, ``positions``: see
        ``encode``."""
        if with_nsp:
            return self.mlm_and_nsp(tokens, attention_mask, token_type_ids, document_ids, positions)
        h = self.encode(tokens, attention_mask, token_type_ids, document_ids, positions)
        if self.mlm_head is None:
            return h, attention_mask
        return self.mlm_head(h, self.embeddings.word_embeddings.weight)

    def mlm_and_nsp(self, tokens, attention_mask=None, token_type_ids=None, document_ids=None, positions=None):
        """-> (MLM logits (B, T, V), NSP logits (B, 2) or None)."""
        h = self.encode(tokens, attention_mask, token_type_ids, document_ids, positions)
        mlm = self.mlm_head(h, self.embeddings.word_embeddings.weight)
        nsp = None if self.nsp_head is None else self.nsp_head(torch.tanh(self.pooler(h[:, 0])))
        return mlm, nsp
