"""Llama-family stage (llama, mistral, qwen2, qwen3): pre-norm decoder layers with GQA and SwiGLU.

A stage holds only decoder layers [start, end) plus, if asked, the embedding (first stage) and
the final norm + lm_head (last stage). Parameter names are the Hugging Face checkpoint names,
global layer index included (`model.layers.17.self_attn.q_proj.weight`).
"""

from __future__ import annotations

import torch
from torch import nn

from pipesplit.planner.spec import ModelSpec
from pipesplit.runtime.models.layers import GQAttention, PreNormDecoderLayer, RotaryEmbedding, SwiGLUMLP


def attention(spec: ModelSpec, index: int, dtype: torch.dtype, device: torch.device | str) -> GQAttention:
    """Layer `index`'s GQA attention: q/k/v bias (qwen2), q/k norm (qwen3), sliding window (mistral),
    attention sinks (gpt-oss)."""
    sliding = spec.layer_types[index] == "sliding_attention"
    return GQAttention(
        spec.hidden_size,
        spec.num_attention_heads,
        spec.num_kv_heads,
        spec.head_dim,
        qkv_bias=spec.attention_bias,
        o_bias=spec.o_proj_bias,
        qk_norm=spec.qk_norm,
        eps=spec.rms_norm_eps,
        window=spec.sliding_window if sliding else None,
        dtype=dtype,
        device=device,
        sinks=spec.attention_sinks,
    )


def decoder_layer(spec: ModelSpec, index: int, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    mlp = SwiGLUMLP(spec.hidden_size, spec.intermediate_size, spec.mlp_bias, dtype, device)
    attn = attention(spec, index, dtype, device)
    return PreNormDecoderLayer(spec.hidden_size, spec.rms_norm_eps, attn, mlp, dtype, device)


FORMATS = ("none",)


def rotary(spec: ModelSpec) -> RotaryEmbedding:
    return RotaryEmbedding(spec.head_dim, spec.rope_theta, spec.rope_scaling, spec.max_position_embeddings)


def kv_cache_shapes(spec: ModelSpec) -> tuple[tuple[int, ...], ...]:
    """Per-token shapes of one layer's cache tensors: (K, V), each [kv_heads, head_dim]."""
    return ((spec.num_kv_heads, spec.head_dim), (spec.num_kv_heads, spec.head_dim))
