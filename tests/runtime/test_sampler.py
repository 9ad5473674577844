import pytest
import torch

from pipesplit.errors import UserError
from pipesplit.runtime.sampler import SamplingParams, new_request_sampler, sample_tokens


def test_greedy_rows_take_the_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 1.0]])
    samplers = [new_request_sampler(SamplingParams(temperature=0), 0)] * 2
    assert sample_tokens(logits, samplers).tolist() == [1, 0]


def test_same_seed_same_draws_and_top_k_top_p_respected():
    torch.manual_seed(0)
    logits = torch.randn(1, 50)
    params = SamplingParams(temperature=1.0, top_k=5, seed=3)
    draws = lambda: [sample_tokens(logits, [s]).item() for s in [new_request_sampler(params, 3)] for _ in range(40)]
    first = draws()
    assert first == draws()
    assert set(first) <= set(torch.topk(logits[0], 5).indices.tolist())
    s = new_request_sampler(SamplingParams(temperature=1.0, top_p=1e-6), 1)
    assert {sample_tokens(logits, [s]).item() for _ in range(20)} == {int(logits[0].argmax())}


def test_tiny_temperature_does_not_overflow():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    s = new_request_sampler(SamplingParams(temperature=1e-30), 0)
    assert sample_tokens(logits, [s]).item() == 2


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_p": 0}, {"top_k": -2}, {"max_tokens": 0}, {"stop": ("",)}])
def test_bad_params_name_the_field(kwargs):
    with pytest.raises(UserError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


# -- distributions against an independent reference -------------------------------------------------
DRAWS = 10_000
DISTRIBUTION_CASES = [
    dict(temperature=1.0),
    dict(temperature=0.6),
    dict(temperature=1.5, top_k=5),
    dict(temperature=0.8, top_p=0.9),
    dict(temperature=1.2, top_k=12, top_p=0.7),
]


def _logits(vocab: int = 24) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(vocab, generator=gen) * 2.0  # continuous: no ties at the top-k / top-p edges


def _reference_probs(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """transformers' warpers (temperature, then top-k, then top-p), then softmax."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = logits[None].clone()
    ids = torch.zeros(1, 1, dtype=torch.long)
    scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return torch.softmax(scores[0], dim=-1)


@pytest.mark.parametrize("case", DISTRIBUTION_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_sampled_distribution_matches_transformers_warpers(case):
    """Kept sets equal transformers'; the probabilities equal softmax(logits / T) renormalised over
    them; 10,000 draws (one per seed, in one batched call) land within 4.5 standard errors of each
    probability (plus 0.002), and never outside the kept set."""
    from pipesplit.runtime.sampler import token_probabilities

    logits = _logits()
    params = SamplingParams(**case)
    expected = _reference_probs(logits, **case)
    ours = token_probabilities(logits, params)
    assert set(torch.nonzero(ours).flatten().tolist()) == set(torch.nonzero(expected).flatten().tolist())
    assert torch.allclose(ours, expected, atol=1e-6)
    if not params.top_k and params.top_p == 1.0:
        assert torch.allclose(ours, torch.softmax(logits / params.temperature, dim=-1), atol=1e-6)

    samplers = [new_request_sampler(params, seed) for seed in range(DRAWS)]
    draws = sample_tokens(logits.expand(DRAWS, -1), samplers)
    freq = torch.bincount(draws, minlength=logits.numel()).double() / DRAWS
    p = expected.double()
    assert freq[p == 0].sum() == 0
    tolerance = 4.5 * torch.sqrt(p * (1 - p) / DRAWS) + 0.002
    assert torch.all((freq - p).abs() <= tolerance), (freq - p).abs().max()
