"""DeepSeek-family stage (deepseek_v2, deepseek_v3): multi-head latent attention (MLA), dense
SwiGLU MLPs below first_k_dense_replace and MoE blocks with shared experts above.

MLA caches the compressed latent, not K and V: per token and layer one row of
kv_lora_rank + qk_rope_head_dim values (the normalised latent c_kv after kv_a_layernorm, then the
roped shared key k_pe), as SGLang and vLLM do. Attention runs in the absorbed form: the query's
no-rope part is projected into latent space through kv_b_proj's key half, scores are taken against
the cached rows directly (multi-query, one "head" of width rank + rope_dim), and the attended
latents leave through kv_b_proj's value half. No per-head K/V is ever materialised.
"""

from __future__ import annotations

import torch
from torch import nn

from pipesplit.errors import UserError
from pipesplit.planner.spec import ModelSpec
from pipesplit.runtime.models.layers import (
    AttentionBatch,
    Linear,
    PreNormDecoderLayer,
    RMSNorm,
    RotaryEmbedding,
    SwiGLUMLP,
    apply_rotary,
    apply_rotary_interleaved,
    paged_attention,
    yarn_mscale,
)
from pipesplit.runtime.models.moe import SparseMoE

# q_a_layernorm and kv_a_layernorm use the RMSNorm default, not the config's rms_norm_eps
LORA_NORM_EPS = 1e-6


def softmax_scale(spec: ModelSpec) -> float:
    """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)^2 under YaRN with mscale_all_dim."""
    scale = spec.mla.qk_head_dim**-0.5
    scaling = spec.rope_scaling or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default" and scaling.get("mscale_all_dim"):
        original = scaling.get("original_max_position_embeddings") or spec.max_position_embeddings
        factor = float(scaling.get("factor") or spec.max_position_embeddings / original)
        scale *= yarn_mscale(factor, float(scaling["mscale_all_dim"])) ** 2
    return scale


def rope_is_interleaved(spec: ModelSpec) -> bool:
    """DeepSeek rotates adjacent pairs; a deepseek_v3 config may opt out with rope_interleave false."""
    return spec.model_type == "deepseek_v2" or bool(spec.config.get("rope_interleave", True))


class MLAttention(nn.Module):
    """Multi-head latent attention over a paged pool of [kv_lora_rank + qk_rope_head_dim] rows."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        m, hidden, heads = spec.mla, spec.hidden_size, spec.num_attention_heads
        self.heads, self.mla = heads, m
        self.scale = softmax_scale(spec)
        self.rotate = apply_rotary_interleaved if rope_is_interleaved(spec) else apply_rotary
        linear = lambda i, o: Linear(i, o, bias=False, dtype=dtype, device=device)  # noqa: E731
        if m.q_lora_rank:
            self.q_a_proj = linear(hidden, m.q_lora_rank)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, LORA_NORM_EPS, dtype, device)
            self.q_b_proj = linear(m.q_lora_rank, heads * m.qk_head_dim)
        else:
            self.q_proj = linear(hidden, heads * m.qk_head_dim)
        self.kv_a_proj_with_mqa = linear(hidden, m.kv_lora_rank + m.qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, LORA_NORM_EPS, dtype, device)
        # read as a weight only (absorbed into batched matmuls), never called: an nn.Linear, left unpacked
        self.kv_b_proj = nn.Linear(m.kv_lora_rank, heads * (m.qk_nope_head_dim + m.v_head_dim), bias=False,
                                   dtype=dtype, device=device)
        self.o_proj = linear(heads * m.v_head_dim, hidden)

    def forward(self, x: torch.Tensor, batch: AttentionBatch, kv: tuple[torch.Tensor], rope) -> torch.Tensor:
        m, heads, tokens = self.mla, self.heads, x.shape[0]
        rank, nope, rope_dim = m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if m.q_lora_rank else self.q_proj(x)
        q_nope, q_pe = q.view(tokens, heads, m.qk_head_dim).split([nope, rope_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([rank, rope_dim], dim=-1)
        q_pe = self.rotate(q_pe, rope)
        k_pe = self.rotate(k_pe[:, None, :], rope)[:, 0]
        (pool,) = kv
        if pool.dtype != x.dtype:
            raise ValueError(f"KV pool dtype {pool.dtype} differs from the model dtype {x.dtype}")
        pool.index_copy_(0, batch.slot_mapping, torch.cat((self.kv_a_layernorm(latent), k_pe), dim=-1))

        # absorbed form: q_nope . (W_uk c) == (W_uk^T q_nope) . c, and o = W_uv (attn @ c)
        w_kv = self.kv_b_proj.weight.view(heads, nope + m.v_head_dim, rank)
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_kv[:, :nope])  # [heads, T, rank]
        query = torch.cat((q_latent.transpose(0, 1), q_pe), dim=-1)  # [T, heads, rank + rope_dim]
        keys = pool.view(pool.shape[0], 1, rank + rope_dim)
        values = pool[:, None, :rank]
        attended = paged_attention(query, keys, values, batch, self.scale)  # [T, heads * rank]
        out = torch.bmm(attended.view(tokens, heads, rank).transpose(0, 1), w_kv[:, nope:].transpose(1, 2))
        return self.o_proj(out.transpose(0, 1).reshape(tokens, heads * m.v_head_dim))


def decoder_layer(spec: ModelSpec, index: int, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """Decoder layer `index` (global; indices >= num_layers are MTP modules' decoder layers)."""
    if spec.mlp_kind(index) == "moe":
        mlp = SparseMoE(spec.hidden_size, spec.moe, dtype, device, shared_name="shared_experts")
    else:
        mlp = SwiGLUMLP(spec.hidden_size, spec.intermediate_size, False, dtype, device)
    attention = MLAttention(spec, dtype, device)
    return PreNormDecoderLayer(spec.hidden_size, spec.rms_norm_eps, attention, mlp, dtype, device)


def mtp_module(spec: ModelSpec, index: int, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """The multi-token-prediction (NextN) module stored as `model.layers.{index}`: a decoder layer
    plus its own embedding copy, enorm/hnorm, eh_proj and shared_head (norm + head).

    Held for memory-accounting parity with the planner only: pipesplit does not run it (no
    speculative decoding), so it takes no KV cache and no compute.
    """
    h, eps = spec.hidden_size, spec.rms_norm_eps
    module = decoder_layer(spec, index, dtype, device)
    module.embed_tokens = nn.Embedding(spec.vocab_size, h, dtype=dtype, device=device)
    module.enorm = RMSNorm(h, eps, dtype, device)
    module.hnorm = RMSNorm(h, eps, dtype, device)
    module.eh_proj = Linear(2 * h, h, bias=False, dtype=dtype, device=device)
    module.shared_head = nn.Module()
    module.shared_head.norm = RMSNorm(h, eps, dtype, device)
    module.shared_head.head = Linear(h, spec.vocab_size, bias=False, dtype=dtype, device=device)
    return module


FORMATS = ("none", "fp8")


def check_spec(spec: ModelSpec) -> None:
    if spec.mla is None:
        raise UserError(
            f"{spec.model_type} models without MLA are not deepseek-family; the deepseek stage cannot build them"
        )


def rotary(spec: ModelSpec) -> RotaryEmbedding:
    return RotaryEmbedding(spec.mla.qk_rope_head_dim, spec.rope_theta, spec.rope_scaling, spec.max_position_embeddings)


def held_layers(spec: ModelSpec, dtype: torch.dtype, device: torch.device | str) -> dict[int, nn.Module]:
    """The MTP modules (`model.layers.{num_layers + i}`), held by the last stage but never run."""
    if not spec.num_mtp_layers:
        raise UserError(f"{spec.name} has no MTP layers (num_nextn_predict_layers); drop --mtp")
    return {i: mtp_module(spec, i, dtype, device) for i in range(spec.num_layers, spec.num_layers + spec.num_mtp_layers)}


def kv_cache_shapes(spec: ModelSpec) -> tuple[tuple[int, ...], ...]:
    """One cache tensor per layer: per token the latent plus the rope key, [kv_lora_rank + qk_rope_head_dim]."""
    return ((spec.mla.kv_cache_dim,),)
