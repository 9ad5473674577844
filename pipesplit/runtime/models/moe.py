"""Shared mixture-of-experts layers: the router, the routed experts and the shared experts.

Routers (all from `MoESpec`):
- softmax top-k, optionally renormalised (mixtral, qwen2_moe, qwen3_moe with norm_topk_prob);
- DeepSeek-V2: softmax, then greedy top-k or group_limited_greedy (best `topk_group` groups by
  their best expert, top-k inside them);
- DeepSeek-V3 noaux_tc: sigmoid scores; `e_score_correction_bias` is added for the choice only
  (groups ranked by the sum of their two best biased scores), the weights are the unbiased
  scores of the chosen experts, renormalised if norm_topk_prob, times routed_scaling_factor.

Experts are one small gated MLP each, named as in the checkpoint (`experts.3.gate_proj.weight`,
Mixtral `experts.3.w1.weight`). The forward groups tokens by expert and runs only the experts
that received tokens: T * top_k rows of work, not T * num_experts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pipesplit.planner.spec import MoESpec
from pipesplit.runtime.models.layers import Linear, SwiGLUMLP

GATE_UP_DOWN = ("gate_proj", "up_proj", "down_proj")
MIXTRAL_EXPERT_NAMES = ("w1", "w3", "w2")  # gate, up, down


class Router(nn.Module):
    """Scores the experts of every token and picks top_k: returns (weights [T, k] float32, experts [T, k])."""

    def __init__(self, hidden: int, moe: MoESpec, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        if moe.router_bias:
            raise ValueError("routers with a bias (gpt-oss) are not part of this module")
        if moe.topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ValueError(f"topk_method {moe.topk_method!r} is not supported")
        self.moe = moe
        self.weight = nn.Parameter(torch.empty(moe.num_experts, hidden, dtype=dtype, device=device))
        if moe.score_correction_bias:
            # a persistent buffer, as in the checkpoint: counted among the stage's weights
            self.register_buffer("e_score_correction_bias", torch.empty(moe.num_experts, dtype=dtype, device=device))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        moe = self.moe
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.softmax(-1) if moe.scoring_func == "softmax" else logits.sigmoid()
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias.float()
        if moe.topk_method != "greedy" and moe.n_group > 1:
            choice = self._best_groups_only(choice)
        experts = torch.topk(choice, moe.num_experts_per_tok, dim=-1).indices
        weights = scores.gather(1, experts)
        if moe.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        if moe.routed_scaling_factor != 1.0:
            weights = weights * moe.routed_scaling_factor
        return weights, experts

    def _best_groups_only(self, choice: torch.Tensor) -> torch.Tensor:
        """Scores outside each token's topk_group best expert groups masked out."""
        moe = self.moe
        grouped = choice.view(choice.shape[0], moe.n_group, moe.num_experts // moe.n_group)
        if moe.topk_method == "noaux_tc":
            group_scores, masked = grouped.topk(2, dim=-1).values.sum(-1), float("-inf")
        else:  # group_limited_greedy
            group_scores, masked = grouped.max(-1).values, 0.0
        best = torch.topk(group_scores, moe.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return grouped.masked_fill(~keep[:, :, None], masked).view_as(choice)


class Expert(nn.Module):
    """One routed expert: down(silu(gate(x)) * up(x)), with the checkpoint's projection names."""

    def __init__(
        self, hidden: int, width: int, dtype: torch.dtype, device: torch.device | str, names=GATE_UP_DOWN
    ) -> None:
        super().__init__()
        self.names = names
        gate, up, down = names
        setattr(self, gate, Linear(hidden, width, bias=False, dtype=dtype, device=device))
        setattr(self, up, Linear(hidden, width, bias=False, dtype=dtype, device=device))
        setattr(self, down, Linear(width, hidden, bias=False, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(F.silu(gate(x)) * up(x))


class SparseMoE(nn.Module):
    """Router + routed experts (+ shared experts, optionally behind qwen2_moe's sigmoid gate).

    shared_name: the shared MLP's checkpoint name (`shared_experts` in DeepSeek, `shared_expert`
    in Qwen2-MoE).
    """

    def __init__(
        self,
        hidden: int,
        moe: MoESpec,
        dtype: torch.dtype,
        device: torch.device | str,
        expert_names: tuple[str, str, str] = GATE_UP_DOWN,
        shared_name: str = "shared_experts",
    ) -> None:
        super().__init__()
        self.gate = Router(hidden, moe, dtype, device)
        self.experts = nn.ModuleList(
            Expert(hidden, moe.intermediate_size, dtype, device, expert_names) for _ in range(moe.num_experts)
        )
        self.shared_name = shared_name if moe.num_shared_experts else None
        if self.shared_name:
            setattr(self, shared_name, SwiGLUMLP(hidden, moe.shared_intermediate_size, False, dtype, device))
        if moe.shared_expert_gate:
            self.shared_expert_gate = Linear(hidden, 1, bias=False, dtype=dtype, device=device)
        else:
            self.shared_expert_gate = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.gate(x)
        out = self.routed(x, weights, experts)
        if self.shared_name:
            shared = getattr(self, self.shared_name)(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out

    def routed(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """sum_k weights[t, k] * expert_{experts[t, k]}(x[t]), computed expert by expert."""
        return route_to_experts(x, weights, experts, len(self.experts), lambda e, rows: self.experts[e](rows))


def route_to_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    num_experts: int,
    run_expert: Callable[[int, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """sum_k weights[t, k] * run_expert(experts[t, k], x[t]): tokens grouped by expert, and only
    the experts that received tokens run (T * top_k rows of work)."""
    top_k = experts.shape[1]
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    token_of = order // top_k
    # one gather in, one weighted scatter out; per expert only its own rows, as views
    rows_in = x.index_select(0, token_of)
    rows_out = torch.empty_like(rows_in)
    start = 0
    for expert, n in enumerate(counts):
        if n:
            rows_out[start : start + n] = run_expert(expert, rows_in[start : start + n])
            start += n
    weighted = rows_out * weights.reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, token_of, weighted.to(x.dtype))
