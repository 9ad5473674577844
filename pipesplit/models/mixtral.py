"""Mixtral-family stage (mixtral, qwen2_moe, qwen3_moe): llama-style GQA attention, and per layer
either a dense SwiGLU MLP or a sparse MoE block (spec.mlp_kinds).

Checkpoint names: Mixtral `model.layers.{i}.block_sparse_moe.{gate,experts.{e}.w1/w2/w3}`;
Qwen-MoE `model.layers.{i}.mlp.{gate,experts.{e}.gate_proj/up_proj/down_proj}`, plus Qwen2-MoE's
`mlp.shared_expert.*` and `mlp.shared_expert_gate`.
"""

from __future__ import annotations

import torch
from torch import nn

from pipesplit.models.layers import DecoderStage, PreNormDecoderLayer, RotaryEmbedding, SwiGLUMLP, check_buildable
from pipesplit.models.llama import attention as llama_attention
from pipesplit.models.llama import kv_cache_shapes  # noqa: F401 -- the same GQA cache; the registry reads it here
from pipesplit.models.moe import GATE_UP_DOWN, MIXTRAL_EXPERT_NAMES, SparseMoE
from pipesplit.spec import ModelSpec


def decoder_layer(spec: ModelSpec, index: int, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    attention = llama_attention(spec, index, dtype, device)
    mixtral = spec.model_type == "mixtral"
    if spec.mlp_kinds[index] == "moe":
        names = MIXTRAL_EXPERT_NAMES if mixtral else GATE_UP_DOWN
        mlp = SparseMoE(spec.hidden_size, spec.moe, dtype, device, expert_names=names, shared_name="shared_expert")
    else:
        mlp = SwiGLUMLP(spec.hidden_size, spec.intermediate_size, spec.mlp_bias, dtype, device)
    mlp_name = "block_sparse_moe" if mixtral else "mlp"
    return PreNormDecoderLayer(spec.hidden_size, spec.rms_norm_eps, attention, mlp, dtype, device, mlp_name)


def build_stage(
    spec: ModelSpec,
    layers: tuple[int, int],
    embedding: bool,
    lm_head: bool,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> DecoderStage:
    check_buildable(spec, "mixtral", ("none", "fp8"))
    rotary = RotaryEmbedding(spec.head_dim, spec.rope_theta, spec.rope_scaling, spec.max_position_embeddings)
    return DecoderStage(
        spec, layers, embedding, lm_head, lambda i: decoder_layer(spec, i, dtype, device), rotary, dtype, device
    )

