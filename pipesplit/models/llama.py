"""Llama-family stage (llama, mistral, qwen2, qwen3): pre-norm decoder layers with GQA and SwiGLU.

A stage holds only decoder layers [start, end) plus, if asked, the embedding (first stage) and
the final norm + lm_head (last stage). Parameter names are the Hugging Face checkpoint names,
global layer index included (`model.layers.17.self_attn.q_proj.weight`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipesplit.errors import UserError
from pipesplit.models.layers import AttentionBatch, GQAttention, RMSNorm, RotaryEmbedding, SwiGLUMLP
from pipesplit.spec import ModelSpec

KVCache = dict[int, tuple[torch.Tensor, ...]]


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, index: int, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        sliding = spec.layer_types[index] == "sliding_attention"
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device)
        self.self_attn = GQAttention(
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
        )
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device)
        self.mlp = SwiGLUMLP(spec.hidden_size, spec.intermediate_size, spec.mlp_bias, dtype, device)

    def forward(self, h: torch.Tensor, batch: AttentionBatch, kv: tuple[torch.Tensor, ...], rope) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), batch, kv, rope)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaStage(nn.Module):
    """Decoder layers [start, end) of a llama-family model, with embedding and/or head if asked.

    forward(inputs, batch, kv_cache): inputs are token ids [T] when the stage has the embedding,
    else the residual stream [T, hidden]. Returns float32 logits [len(batch.logits_indices), vocab]
    when the stage has the lm_head, else the residual stream [T, hidden].
    """

    def __init__(
        self,
        spec: ModelSpec,
        layers: tuple[int, int],
        embedding: bool,
        lm_head: bool,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        start, end = layers
        if not 0 <= start <= end <= spec.num_layers:
            raise ValueError(f"layers {start}..{end} out of range for a model with {spec.num_layers} layers")
        self.spec = spec
        self.layer_range = (start, end)
        self.has_embedding, self.has_lm_head = embedding, lm_head
        self.model = nn.Module()
        if embedding:
            self.model.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size, dtype=dtype, device=device)
        self.model.layers = nn.ModuleDict({str(i): DecoderLayer(spec, i, dtype, device) for i in range(start, end)})
        if lm_head:
            self.model.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device)
            # tied and holding the embedding (PP=1): the head reads the embedding's weight, stored once
            if not (spec.tie_word_embeddings and embedding):
                self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False, dtype=dtype, device=device)
        self.rotary = RotaryEmbedding(spec.head_dim, spec.rope_theta, spec.rope_scaling, spec.max_position_embeddings)
        self._layers = [(int(i), layer) for i, layer in self.model.layers.items()]

    def head_weight(self) -> torch.Tensor:
        return self.lm_head.weight if hasattr(self, "lm_head") else self.model.embed_tokens.weight

    def forward(self, inputs: torch.Tensor, batch: AttentionBatch, kv_cache: KVCache) -> torch.Tensor:
        h = self.model.embed_tokens(inputs) if self.has_embedding else inputs
        if self._layers:
            rope = self.rotary(batch.positions, h.dtype)
            for index, layer in self._layers:
                h = layer(h, batch, kv_cache[index], rope)
        if not self.has_lm_head:
            return h
        h = self.model.norm(h.index_select(0, batch.logits_indices))
        return F.linear(h, self.head_weight()).float()


def build_stage(
    spec: ModelSpec,
    layers: tuple[int, int],
    embedding: bool,
    lm_head: bool,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> LlamaStage:
    if spec.family != "llama":
        raise UserError(f"{spec.model_type} models are not llama-family; the llama stage cannot build them")
    if spec.quantization.method != "none":
        raise UserError(f"{spec.quantization.method} checkpoints of {spec.model_type} models are not supported; "
                        "use an unquantized checkpoint")
    return LlamaStage(spec, layers, embedding, lm_head, dtype, device)


def kv_cache_shapes(spec: ModelSpec) -> tuple[tuple[int, ...], ...]:
    """Per-token shapes of one layer's cache tensors: (K, V), each [kv_heads, head_dim]."""
    return ((spec.num_kv_heads, spec.head_dim), (spec.num_kv_heads, spec.head_dim))
