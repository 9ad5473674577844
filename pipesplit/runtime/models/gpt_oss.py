"""gpt-oss stage: GQA attention with q/k/v/o biases and a learned sink logit per head, sliding
and full layers alternating (`layer_types`), YaRN rope, and per layer a MoE of fused experts.

The MoE (`model.layers.{i}.mlp`): a router with a bias (`router.weight`, `router.bias`) whose
top-k logits are softmaxed, and experts stored as one tensor per projection for all experts, as
transformers' GptOssExperts holds them: `experts.gate_up_proj` [E, hidden, 2 * inter] with gate
and up interleaved column by column, `experts.down_proj` [E, inter, hidden], and their `_bias`.
Each expert is the clamped SwiGLU (up.clamp(-limit, limit) + 1) * g * sigmoid(alpha * g) with
g = gate.clamp(max=limit). MXFP4 checkpoints store the expert weights as `*_blocks` +
`*_scales`; the loader dequantizes them (the stage's own layers only) to these shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipesplit.errors import UserError
from pipesplit.planner.spec import ModelSpec, MoESpec
from pipesplit.runtime.models.layers import PreNormDecoderLayer
from pipesplit.runtime.models.llama import attention as llama_attention

# The same GQA cache and rotary (YaRN through rope_scaling) as llama; the registry reads them here.
from pipesplit.runtime.models.llama import kv_cache_shapes, rotary  # noqa: F401
from pipesplit.runtime.models.moe import route_to_experts

FORMATS = ("none", "mxfp4")


class GptOssRouter(nn.Module):
    """softmax over the top-k of (W x + b): (weights [T, k] float32, experts [T, k])."""

    def __init__(self, hidden: int, moe: MoESpec, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.top_k = moe.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(moe.num_experts, hidden, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(moe.num_experts, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.weight.float(), self.bias.float())
        top, experts = torch.topk(logits, self.top_k, dim=-1)
        return top.softmax(-1), experts


class GptOssExperts(nn.Module):
    """All experts of a layer in four tensors (checkpoint names); only routed rows are computed."""

    def __init__(self, hidden: int, moe: MoESpec, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        e, width = moe.num_experts, moe.intermediate_size
        self.alpha, self.limit = moe.swiglu_alpha, moe.swiglu_limit
        self.gate_up_proj = nn.Parameter(torch.empty(e, hidden, 2 * width, dtype=dtype, device=device))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(e, 2 * width, dtype=dtype, device=device))
        self.down_proj = nn.Parameter(torch.empty(e, width, hidden, dtype=dtype, device=device))
        self.down_proj_bias = nn.Parameter(torch.empty(e, hidden, dtype=dtype, device=device))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate_up = torch.addmm(self.gate_up_proj_bias[e], x, self.gate_up_proj[e])
        gate = gate_up[:, 0::2].clamp(max=self.limit)
        up = gate_up[:, 1::2].clamp(-self.limit, self.limit)
        gated = (up + 1) * gate * torch.sigmoid(gate * self.alpha)
        return torch.addmm(self.down_proj_bias[e], gated, self.down_proj[e])

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        return route_to_experts(x, weights, experts, self.gate_up_proj.shape[0], self.expert)


class GptOssMoE(nn.Module):
    def __init__(self, hidden: int, moe: MoESpec, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.router = GptOssRouter(hidden, moe, dtype, device)
        self.experts = GptOssExperts(hidden, moe, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.router(x)
        return self.experts(x, weights, experts)


def check_spec(spec: ModelSpec) -> None:
    moe = spec.moe
    if moe is None or moe.swiglu_limit is None or not (moe.router_bias and moe.expert_bias):
        raise UserError(f"{spec.name}: gpt_oss needs experts with router and expert biases and swiglu_limit")
    if set(spec.mlp_kinds) != {"moe"}:
        raise UserError(f"{spec.name}: every gpt_oss layer is a MoE layer")


def decoder_layer(spec: ModelSpec, index: int, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    attention = llama_attention(spec, index, dtype, device)
    mlp = GptOssMoE(spec.hidden_size, spec.moe, dtype, device)
    return PreNormDecoderLayer(spec.hidden_size, spec.rms_norm_eps, attention, mlp, dtype, device)
