"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3), our own code.

The variants differ only by flags in ``ModelArgs``: q/k/v bias (Qwen2),
per-head q/k RMSNorm (Qwen3), explicit head_dim, tied embeddings, rope
scaling. q/k/v and gate/up are fused into one matmul each; the loader
splits checkpoint tensors into the fused weights.

The forward pass takes a flat batch of T tokens from many sequences and an
``AttentionMetadata`` describing them; the KV cache is passed in, one
(k, v) pair per layer, owned by the model runner.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.backend import AttentionBackend
from ..attention.metadata import AttentionMetadata
from .config import ModelArgs
from .fused_ops import rms_norm, silu_and_mul


def _param(*shape: int) -> nn.Parameter:
    # Uninitialised: weights always come from the loader (or dummy init).
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = _param(dim)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        """``norm(x)``; with a residual, ``(norm(x + residual), x + residual)`` in one pass on the GPU."""
        y, new_residual = rms_norm(x, self.weight, self.eps, residual)
        return y if residual is None else (y, new_residual)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj_weight = _param(self.q_size + 2 * self.kv_size, args.hidden_size)
        self.qkv_proj_bias = _param(self.q_size + 2 * self.kv_size) if args.attention_bias else None
        self.o_proj_weight = _param(args.hidden_size, self.q_size)
        if args.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.scale = self.head_dim**-0.5

    def forward(self, x, kv_cache, cos_sin, meta: AttentionMetadata, backend: AttentionBackend):
        qkv = F.linear(x, self.qkv_proj_weight, self.qkv_proj_bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        o = backend.forward(q, k, v, kv_cache[0], kv_cache[1], cos_sin, meta, self.scale)
        return F.linear(o.reshape(-1, self.q_size), self.o_proj_weight)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.inter = args.intermediate_size
        self.gate_up_proj_weight = _param(2 * args.intermediate_size, args.hidden_size)
        self.down_proj_weight = _param(args.hidden_size, args.intermediate_size)

    def forward(self, x):
        return F.linear(silu_and_mul(F.linear(x, self.gate_up_proj_weight)), self.down_proj_weight)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, residual, kv_cache, cos_sin, meta, backend):
        # The residual add of each block is folded into the next norm (one pass on the GPU).
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, kv_cache, cos_sin, meta, backend)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = _param(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = self.embed_tokens if args.tie_word_embeddings else _param(args.vocab_size, args.hidden_size)

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        cos_sin: torch.Tensor,
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:  # [T, hidden] after the final norm
        x, residual = F.embedding(input_ids, self.embed_tokens), None
        for layer, kv in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, kv, cos_sin, meta, backend)
        return self.norm(x) if residual is None else self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head)
