"""Sampling parameters and the sampler that turns last-stage logits into token ids."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipesplit.errors import UserError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token; defaults follow vLLM's `SamplingParams`."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 16
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if not self.temperature >= 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if self.max_tokens < 1:
            raise UserError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise UserError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass
class RequestSampler:
    """Per-request sampling state on the last stage: the params and a seeded generator."""

    params: SamplingParams
    generator: "torch.Generator | None" = field(default=None)


def new_request_sampler(params: SamplingParams, seed: int) -> RequestSampler:
    import torch

    if params.greedy:
        return RequestSampler(params)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return RequestSampler(params, generator)


def sample_tokens(logits: "torch.Tensor", samplers: list[RequestSampler]) -> "torch.Tensor":
    """One token id per row of `logits` [B, vocab].

    Greedy rows share one argmax; sampled rows draw from their own generator one at a time, so a
    request's tokens depend only on its seed, never on the batch it happened to share.
    """
    import torch

    tokens = torch.argmax(logits, dim=-1)
    for row, sampler in enumerate(samplers):
        if sampler.params.greedy:
            continue
        tokens[row] = _sample_row(logits[row].float(), sampler)
    return tokens


def token_probabilities(logits: "torch.Tensor", params: SamplingParams) -> "torch.Tensor":
    """The distribution a sampled row draws from: softmax(logits / temperature) over the tokens that
    top-k and then top-p keep (the order transformers' logits warpers apply), renormalised."""
    import torch

    # Shift before scaling: a tiny temperature then gives -inf for the others, never inf - inf.
    logits = (logits - logits.max()) / params.temperature
    if params.top_k > 0 and params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs = probs / probs.sum()
    return probs


def _sample_row(logits: "torch.Tensor", sampler: RequestSampler) -> int:
    import torch

    probs = token_probabilities(logits, sampler.params)
    return int(torch.multinomial(probs, 1, generator=sampler.generator).item())
