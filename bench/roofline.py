"""What the GPU's bandwidth and matmul rate allow for a workload.

Prefill runs at the matmul rate. Each decode step k runs every sequence
still generating at step k (as if all fit at once: the ideal schedule) and
costs max(FLOPs / rate, bytes / bandwidth), where the bytes are the weights
once (all but the embedding table) plus every active sequence's KV cache.

Tensor parallel over N GPUs (``num_gpus``): each GPU holds 1/N of the
weights and of the KV heads and does 1/N of the FLOPs, so a step costs the
same max() over N times the bandwidth and N times the matmul rate. (With
fewer KV heads than GPUs each KV head is stored on N / kv_heads GPUs; the KV
bytes are counted that many times.) The two all-reduces per layer are not in
the roofline: they move only ``2 x tokens x hidden`` bytes but cost a few
microseconds of latency each, which is what keeps single-stream decode
below N-fold.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Shape:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    vocab: int
    tied: bool

    @classmethod
    def from_hf(cls, cfg: dict) -> "Shape":
        heads = cfg["num_attention_heads"]
        return cls(cfg["num_hidden_layers"], cfg["hidden_size"], heads, cfg.get("num_key_value_heads") or heads,
                   cfg.get("head_dim") or cfg["hidden_size"] // heads, cfg["intermediate_size"], cfg["vocab_size"],
                   bool(cfg.get("tie_word_embeddings")))

    @property
    def matmul_params(self) -> int:
        """Parameters used as matmul weights per token (layers + LM head)."""
        attn = self.hidden * (self.heads + 2 * self.kv_heads) * self.head_dim + self.heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.inter
        return self.layers * (attn + mlp) + self.vocab * self.hidden

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


def roofline_seconds(shape: Shape, prompt_lens: list[int], out_lens: list[int], copy_bw: float, matmul_rate: float,
                     dtype_bytes: int = 2, num_gpus: int = 1, kv_dtype_bytes: int | None = None) -> dict:
    """``copy_bw`` and ``matmul_rate`` are one GPU's; ``num_gpus`` of them split the model (tensor parallel).
    ``kv_dtype_bytes``: bytes per cached K/V element (1 for an fp8 cache; default ``dtype_bytes``)."""
    kv_copies = max(1.0, num_gpus / shape.kv_heads)
    copy_bw, matmul_rate = copy_bw * num_gpus, matmul_rate * num_gpus
    attn_flops_per_ctx = 4 * shape.layers * shape.heads * shape.head_dim  # QK^T and PV per (query, key) pair
    prefill_flops = sum(2 * shape.matmul_params * n + attn_flops_per_ctx * n * (n + 1) / 2 for n in prompt_lens)
    prefill_s = prefill_flops / matmul_rate
    weight_bytes = shape.matmul_params * dtype_bytes
    kvb = shape.kv_bytes_per_token(kv_dtype_bytes or dtype_bytes) * kv_copies
    decode_s = 0.0
    # The first output token comes from prefill; decode step k produces token k+1.
    for k in range(1, max(out_lens)):
        active = [(p, o) for p, o in zip(prompt_lens, out_lens) if o > k]
        if not active:
            break
        ctx = sum(p + k for p, _ in active)
        flops = 2 * shape.matmul_params * len(active) + attn_flops_per_ctx * ctx
        bytes_ = weight_bytes + kvb * ctx
        decode_s += max(flops / matmul_rate, bytes_ / copy_bw)
    return {"prefill_s": prefill_s, "decode_s": decode_s, "total_s": prefill_s + decode_s,
            "prefill_tflop": prefill_flops / 1e12}
