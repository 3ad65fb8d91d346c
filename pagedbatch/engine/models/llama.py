"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3), our own code.

The variants differ only by flags in ``ModelArgs``: q/k/v bias (Qwen2;
Llama and Qwen3 with ``attention_bias``, which adds an o_proj bias too),
gate/up/down bias (Llama's ``mlp_bias``), per-head q/k RMSNorm (Qwen3),
explicit head_dim, tied embeddings, rope scaling. q/k/v and gate/up are
fused into one matmul each; the loader splits checkpoint tensors into the
fused weights.

The forward pass takes a flat batch of T tokens from many sequences and an
``AttentionMetadata`` describing them; the KV cache is passed in, one
(k, v) pair per layer, owned by the model runner.

fp8 (``quantization.py``): the decoder layers' linear weights listed in
``fp8_params`` are ``float8_e4m3fn`` with a float32 ``<name>_scale`` per
output channel, and every matmul goes through ``linear.linear``, which
picks the kernel. Embeddings, norms and the LM head keep the model dtype.

Tensor parallel (``sharding.py`` says how the weights are cut): the modules
are built at this rank's shape (``local_args``), and ``comm.all_reduce``
sums the row-parallel outputs: once after attention, once after the MLP,
and once after the vocab-parallel embedding lookup. Every rank then holds
the same full hidden states, so norms and residuals need no communication.
A row-parallel layer's bias (o_proj, down_proj) is whole on every rank and
added after the sum: added before it, it would count once per rank.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..attention.backend import AttentionBackend
from ..attention.metadata import AttentionMetadata
from .config import ModelArgs
from .fp8 import FP8
from .fused_ops import rms_norm
from .linear import fuses_rope, linear, norm_linear, silu_mul_linear
from .skinny_gemm import RopeCacheOut
from .sharding import TPShard, local_args, vocab_range


def _param(*shape: int) -> nn.Parameter:
    # Uninitialised: weights always come from the loader (or dummy init).
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def _linear_params(n: int, k: int, fp8: bool) -> tuple[nn.Parameter, Optional[nn.Parameter]]:
    """A linear layer's weight [n, k] and, for fp8, its per-output-channel scales [n] (float32)."""
    if not fp8:
        return _param(n, k), None
    return (nn.Parameter(torch.empty(n, k, dtype=FP8), requires_grad=False),
            nn.Parameter(torch.empty(n, dtype=torch.float32), requires_grad=False))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = _param(dim)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        """``norm(x)``; with a residual, ``(norm(x + residual), x + residual)`` in one pass on the GPU.
        (A layer's two norms run through ``linear.norm_linear`` with the matmul after them.)"""
        y, new_residual = rms_norm(x, self.weight, self.eps, residual)
        return y if residual is None else (y, new_residual)


class Attention(nn.Module):
    """``fp8``: which of its linear weights (``qkv_proj_weight``, ``o_proj_weight``) are fp8."""

    def __init__(self, args: ModelArgs, comm=None, fp8: frozenset = frozenset()):
        super().__init__()
        self.comm = comm
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj_weight, self.qkv_proj_weight_scale = _linear_params(
            self.q_size + 2 * self.kv_size, args.hidden_size, "qkv_proj_weight" in fp8)
        self.qkv_proj_bias = _param(self.q_size + 2 * self.kv_size) if args.attention_bias else None
        self.o_proj_weight, self.o_proj_weight_scale = _linear_params(args.hidden_size, self.q_size,
                                                                      "o_proj_weight" in fp8)
        self.o_proj_bias = _param(args.hidden_size) if args.o_proj_bias else None
        if args.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.scale = self.head_dim**-0.5
        # An fp8 KV cache's [k_scale, v_scale] (value = stored * scale): from the checkpoint, else 1.0.
        # A device tensor, not floats, so captured CUDA graphs read it; ignored by a cache in the model dtype.
        self.register_buffer("kv_scale", torch.ones(2, dtype=torch.float32), persistent=False)

    def forward(self, x, residual, norm: RMSNorm, kv_cache, cos_sin, meta: AttentionMetadata,
                backend: AttentionBackend) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention output of ``norm(x + residual)``, the new residual): the norm goes with the qkv matmul,
        and so do the rotary embedding and the cache write where the matmul can take them (linear.fuses_rope)
        and the backend attends over a cache already written (its ``attends_written_cache``)."""
        rope = None
        if self.q_norm is None and getattr(backend, "attends_written_cache", False) \
                and fuses_rope(x.shape[0], self.qkv_proj_weight, self.qkv_proj_weight_scale, x.device):
            rope = RopeCacheOut(cos_sin, meta.positions, meta.slot_mapping, kv_cache[0], kv_cache[1], self.kv_scale,
                                self.q_size, self.kv_size)
        qkv, residual = norm_linear(x, residual, norm.weight, norm.eps, self.qkv_proj_weight, self.qkv_proj_bias,
                                    self.qkv_proj_weight_scale, rope=rope)
        if rope is None:
            return self.attend(qkv, kv_cache, cos_sin, meta, backend), residual
        q = qkv[:, :self.q_size].view(-1, self.num_heads, self.head_dim)  # rotated; k and v are in the cache
        return self._o_proj(backend.attend(q, kv_cache[0], kv_cache[1], meta, self.scale, self.kv_scale)), residual

    def attend(self, qkv, kv_cache, cos_sin, meta: AttentionMetadata, backend: AttentionBackend):
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is None:
            o = backend.forward(q, k, v, kv_cache[0], kv_cache[1], cos_sin, meta, self.scale, self.kv_scale)
        elif getattr(backend, "fuses_qk_norm", False):  # one kernel for norms, rotary and the cache write
            o = backend.forward(q, k, v, kv_cache[0], kv_cache[1], cos_sin, meta, self.scale, self.kv_scale,
                                qk_norm=(self.q_norm.weight, self.k_norm.weight, self.q_norm.eps))
        else:
            q, k = self.q_norm(q), self.k_norm(k)
            o = backend.forward(q, k, v, kv_cache[0], kv_cache[1], cos_sin, meta, self.scale, self.kv_scale)
        return self._o_proj(o)

    def _o_proj(self, o):
        # Without TP the bias goes inside the matmul, as transformers adds it; with TP after the sum.
        out = linear(o.reshape(-1, self.q_size), self.o_proj_weight, self.o_proj_bias if self.comm is None else None,
                     self.o_proj_weight_scale)
        return out if self.comm is None else _reduce_then_bias(self.comm, out, self.o_proj_bias)


def _reduce_then_bias(comm, out: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """A row-parallel layer's partial sums reduced, then its bias added once (added per rank it would count tp times)."""
    out = comm.all_reduce(out)
    return out if bias is None else out + bias


class MLP(nn.Module):
    def __init__(self, args: ModelArgs, comm=None, fp8: frozenset = frozenset()):
        super().__init__()
        self.comm = comm
        self.inter = args.intermediate_size
        self.gate_up_proj_weight, self.gate_up_proj_weight_scale = _linear_params(
            2 * args.intermediate_size, args.hidden_size, "gate_up_proj_weight" in fp8)
        self.down_proj_weight, self.down_proj_weight_scale = _linear_params(
            args.hidden_size, args.intermediate_size, "down_proj_weight" in fp8)
        self.gate_up_proj_bias = _param(2 * args.intermediate_size) if args.mlp_bias else None
        self.down_proj_bias = _param(args.hidden_size) if args.mlp_bias else None

    def forward(self, x, residual, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
        """(MLP output of ``norm(x + residual)``, the new residual): the norm goes with the gate_up matmul."""
        gate_up, residual = norm_linear(x, residual, norm.weight, norm.eps, self.gate_up_proj_weight,
                                        self.gate_up_proj_bias, self.gate_up_proj_weight_scale)
        out = silu_mul_linear(gate_up, self.down_proj_weight, self.down_proj_weight_scale,
                              self.down_proj_bias if self.comm is None else None)
        return (out if self.comm is None else _reduce_then_bias(self.comm, out, self.down_proj_bias)), residual


class DecoderLayer(nn.Module):
    """``fp8``: its fp8 linear weights, named inside the layer (``self_attn.qkv_proj_weight``)."""

    def __init__(self, args: ModelArgs, comm=None, fp8: frozenset = frozenset()):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, comm, _inside(fp8, "self_attn."))
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args, comm, _inside(fp8, "mlp."))

    def forward(self, x, residual, kv_cache, cos_sin, meta, backend):
        # The residual add of each block is folded into the next norm, and the norm into the linear after it
        # (linear.norm_linear: one kernel at decode's few rows, else the norm kernel, which quantizes its
        # output on the fp8 _scaled_mm route).
        h, residual = self.self_attn(x, residual, self.input_layernorm, kv_cache, cos_sin, meta, backend)
        return self.mlp(h, residual, self.post_attention_layernorm)


def _inside(names: frozenset, prefix: str) -> frozenset:
    return frozenset(n[len(prefix):] for n in names if n.startswith(prefix))


class LlamaForCausalLM(nn.Module):
    """``args``: the whole model (config.json); ``shard``/``comm``: this rank's place and its collectives
    (``comm`` None when running alone); ``fp8_params``: the linear weights held in fp8
    (``layers.3.mlp.down_proj_weight``, see ``quantization.fp8_param_names``)."""

    def __init__(self, args: ModelArgs, shard: TPShard = TPShard(), comm=None, fp8_params: frozenset = frozenset()):
        super().__init__()
        if (shard.size > 1) != (comm is not None):
            raise ValueError("a tensor-parallel shard needs its communicator, and only it")
        self.args = args
        self.shard = shard
        self.comm = comm
        self.local_args = local = local_args(args, shard)
        self.vocab_start, self.vocab_end = vocab_range(args, shard)
        self.embed_tokens = _param(local.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(local, comm, _inside(fp8_params, f"layers.{i}."))
                                    for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = self.embed_tokens if args.tie_word_embeddings else _param(local.vocab_size, args.hidden_size)
        self.checkpoint_bytes_read = 0  # set by the loader: what this rank read from the weight files
        self.kv_scales_loaded: set[int] = set()  # layers whose KV-cache scales came from the checkpoint

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        cos_sin: torch.Tensor,
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:  # [T, hidden] after the final norm
        x, residual = self._embed(input_ids), None
        for layer, kv in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, kv, cos_sin, meta, backend)
        return self.norm(x) if residual is None else self.norm(x, residual)[0]

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.comm is None:
            return F.embedding(input_ids, self.embed_tokens)
        # Vocab-parallel: each rank looks up the ids in its range, zeros the
        # rest, and the all-reduce adds one non-zero row to zeros (exact).
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local = (input_ids - self.vocab_start).masked_fill_(outside, 0)
        x = F.embedding(local, self.embed_tokens).masked_fill_(outside[:, None], 0.0)
        return self.comm.all_reduce(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over this rank's vocabulary rows (all of them when alone; see ``comm.gather_logits``)."""
        # linear(): at decode's few rows on the GPU the skinny GEMM, which streams the head faster than
        # cuBLAS (Qwen2.5-7B's at one row: 243 against 256 us, bench/skinny_gemm.py); F.linear elsewhere.
        return linear(hidden, self.lm_head)
