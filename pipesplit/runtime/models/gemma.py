"""Gemma 2 / Gemma 3 text stage: local (sliding-window) and global layers interleaved, norms
before and after both attention and MLP, RMSNorm scaled by (1 + weight), embeddings times
sqrt(hidden), GeLU-tanh gated MLP, scores scaled by query_pre_attn_scalar ** -0.5.

Gemma 2 soft-caps attention scores and final logits (c * tanh(x / c)); Gemma 3 normalises q and
k per head instead and rotates local layers with their own rope theta (two rotary tables, each
layer picks its own). Names are the checkpoint's (`model.layers.{i}.pre_feedforward_layernorm`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipesplit.errors import UserError
from pipesplit.planner.spec import ModelSpec
from pipesplit.runtime.models.layers import GQAttention, RMSNorm, RotaryEmbedding, SwiGLUMLP

# The same GQA cache as llama; the registry reads it here.
from pipesplit.runtime.models.llama import kv_cache_shapes  # noqa: F401

FORMATS = ("none",)


class GemmaRMSNorm(RMSNorm):
    """x / rms(x) * (1 + weight), computed in float32 and cast back (a zero weight is the identity)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class GeluMLP(SwiGLUMLP):
    """down(gelu_tanh(gate(x)) * up(x))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_and_up(x)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class GemmaRotary(nn.Module):
    """cos/sin for each layer type: {"full_attention": ..., "sliding_attention": ...}."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        g = spec.gemma
        full = RotaryEmbedding(spec.head_dim, spec.rope_theta, spec.rope_scaling, spec.max_position_embeddings)
        local = full
        if g.local_rope_theta is not None:
            local = RotaryEmbedding(spec.head_dim, g.local_rope_theta, g.local_rope_scaling,
                                    spec.max_position_embeddings)
        self.tables = {"full_attention": full, "sliding_attention": local}

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {kind: table(positions, dtype) for kind, table in self.tables.items()}


class GemmaDecoderLayer(nn.Module):
    """h + post_attn_norm(attn(input_norm(h))), then h + post_ff_norm(mlp(pre_ff_norm(h)))."""

    def __init__(self, spec: ModelSpec, index: int, attention: GQAttention, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        norm = lambda: GemmaRMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device)  # noqa: E731
        self.layer_type = spec.layer_types[index]
        self.input_layernorm = norm()
        self.self_attn = attention
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.mlp = GeluMLP(spec.hidden_size, spec.intermediate_size, False, dtype, device)
        self.post_feedforward_layernorm = norm()

    def forward(self, h: torch.Tensor, batch, kv: tuple[torch.Tensor, ...], rope: dict) -> torch.Tensor:
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), batch, kv, rope[self.layer_type]))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


def check_spec(spec: ModelSpec) -> None:
    if spec.gemma is None:
        raise UserError(f"{spec.name}: gemma models need their Gemma settings (query_pre_attn_scalar, ...)")


def decoder_layer(spec: ModelSpec, index: int, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    g = spec.gemma
    sliding = spec.layer_types[index] == "sliding_attention"
    attention = GQAttention(
        spec.hidden_size, spec.num_attention_heads, spec.num_kv_heads, spec.head_dim,
        qkv_bias=spec.attention_bias, o_bias=spec.o_proj_bias, qk_norm=False, eps=spec.rms_norm_eps,
        window=spec.sliding_window if sliding else None, dtype=dtype, device=device,
        softcap=g.attn_logit_softcapping, scale=g.query_pre_attn_scalar**-0.5,
    )
    if spec.qk_norm:  # Gemma 3: per-head q/k norms with Gemma's (1 + weight)
        attention.q_norm = GemmaRMSNorm(spec.head_dim, spec.rms_norm_eps, dtype, device)
        attention.k_norm = GemmaRMSNorm(spec.head_dim, spec.rms_norm_eps, dtype, device)
    return GemmaDecoderLayer(spec, index, attention, dtype, device)


def rotary(spec: ModelSpec) -> GemmaRotary:
    return GemmaRotary(spec)


def stage_extras(spec: ModelSpec) -> dict:
    return {"final_norm": GemmaRMSNorm, "embed_scale": spec.hidden_size**0.5,
            "logit_softcap": spec.gemma.final_logit_softcapping}
