"""Mixtral-family stage (mixtral, qwen2_moe, qwen3_moe): llama-style GQA attention, and per layer
either a dense SwiGLU MLP or a sparse MoE block (spec.mlp_kinds).

Checkpoint names: Mixtral `model.layers.{i}.block_sparse_moe.{gate,experts.{e}.w1/w2/w3}`;
Qwen-MoE `model.layers.{i}.mlp.{gate,experts.{e}.gate_proj/up_proj/down_proj}`, plus Qwen2-MoE's
`mlp.shared_expert.*` and `mlp.shared_expert_gate`.
"""

from __future__ import annotations

import torch
from torch import nn

from pipesplit.planner.spec import ModelSpec
from pipesplit.runtime.models.layers import PreNormDecoderLayer, SwiGLUMLP
from pipesplit.runtime.models.llama import attention as llama_attention

# The same GQA attention cache and rotary as llama; the registry reads them here.
from pipesplit.runtime.models.llama import kv_cache_shapes, rotary  # noqa: F401
from pipesplit.runtime.models.moe import GATE_UP_DOWN, MIXTRAL_EXPERT_NAMES, SparseMoE


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


FORMATS = ("none", "fp8")
