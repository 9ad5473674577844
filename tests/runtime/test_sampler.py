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
