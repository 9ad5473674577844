"""The engine end to end: stage processes on gloo, agreed capacity, continuous batching."""

from __future__ import annotations

import random

import pytest
import torch

from pipesplit import LLM, SamplingParams
from pipesplit.planner.spec import load_spec
from pipesplit.runtime.plan_bridge import runtime_plan

GiB = 1 << 30


def hf_greedy(folder, prompts, max_tokens):
    """Independent reference: transformers' greedy generate, one prompt at a time."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for ids, n in zip(prompts, max_tokens):
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)
            outs.append(y[0, len(ids):].tolist())
    return outs


@pytest.mark.parametrize(
    "name,pp,partition",
    [("llama", 2, None), ("llama", 3, "1,3,1"), ("llama_tied", 2, "3,1"), ("llama_tied", 3, None), ("qwen2", 2, "1,3")],
)
def test_capacity_and_weights_equal_the_planners_prediction(tiny_checkpoints, name, pp, partition):
    folder = str(tiny_checkpoints[name])
    budget_gib = 0.004
    spec = load_spec(folder)
    budgets = (int(budget_gib * GiB),) * pp
    predicted = runtime_plan(spec, pp, None, partition, "float32", budgets)
    with LLM(folder, dtype="float32", pp=pp, partition=partition, mem_budget_gib=budget_gib, log=False) as llm:
        assert llm.plan == predicted
        assert llm.max_total_num_tokens == predicted.max_total_num_tokens
        for stage, report in zip(predicted.stages, llm.stage_reports):
            assert report.param_bytes == stage.weight_bytes
            assert report.kv_tokens == stage.kv_tokens
        assert llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2))[0].finish_reason == "length"


def _workload(n, seed=0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(1, 60))] for _ in range(n)]
    max_tokens = [rng.randint(1, 12) for _ in range(n)]
    return prompts, max_tokens


@pytest.fixture(scope="module")
def workload_and_reference(tiny_checkpoints):
    prompts, max_tokens = _workload(200)
    return prompts, max_tokens, hf_greedy(tiny_checkpoints["llama"], prompts, max_tokens)


@pytest.mark.parametrize("pp", [2, 3])
def test_200_concurrent_requests_each_equal_greedy_alone(tiny_checkpoints, workload_and_reference, pp):
    prompts, max_tokens, expected = workload_and_reference
    params = [SamplingParams(temperature=0, max_tokens=n) for n in max_tokens]
    with LLM(str(tiny_checkpoints["llama"]), dtype="float32", pp=pp, mem_budget_gib=0.05, max_batch_tokens=256,
             chunked_prefill_size=32, log=False) as llm:
        outputs = llm.generate(prompts, params)
        assert llm.engine.usage()["kv_tokens_used"] == 0
    assert [list(o.token_ids) for o in outputs] == expected
    assert all(o.finish_reason == "length" for o in outputs)


def test_tiny_pool_preempts_and_outputs_stay_exact(tiny_checkpoints, workload_and_reference):
    prompts, max_tokens, expected = workload_and_reference
    folder = str(tiny_checkpoints["llama"])
    spec = load_spec(folder)
    # the smallest budget whose capacity still holds the longest request (prompt + output)
    longest = max(len(p) + n for p, n in zip(prompts, max_tokens))
    budget = 300_000
    while runtime_plan(spec, 2, None, None, "float32", (budget, budget)).max_total_num_tokens < longest + 8:
        budget += 4096
    params = [SamplingParams(temperature=0, max_tokens=n) for n in max_tokens]
    with LLM(folder, dtype="float32", pp=2, mem_budget_gib=budget / GiB, log=False) as llm:
        assert llm.max_total_num_tokens < 4 * longest
        outputs = llm.generate(prompts, params)
        assert llm.engine.stats.preemptions > 0
        assert llm.engine.usage()["kv_tokens_used"] == 0
    assert [list(o.token_ids) for o in outputs] == expected


def test_seeded_sampling_repeats_and_does_not_depend_on_the_batch(tiny_checkpoints):
    with LLM(str(tiny_checkpoints["qwen3"]), dtype="float32", pp=2, mem_budget_gib=0.01, log=False) as llm:
        p = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=12, seed=1234)
        alone = llm.generate([[5, 6, 7]], p)[0].token_ids
        crowd = llm.generate([[5, 6, 7]] * 3 + [[9] * 20] * 5, [p] * 3 + [SamplingParams(max_tokens=12)] * 5)
        other = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=12, seed=99))
    assert all(o.token_ids == alone for o in crowd[:3])
    assert other[0].token_ids != alone


def test_stop_token_ids_and_streaming(tiny_checkpoints, workload_and_reference):
    prompts, _, _ = workload_and_reference
    folder = tiny_checkpoints["llama"]
    full = hf_greedy(folder, [prompts[0]], [10])[0]
    stop_at = full[4]
    with LLM(str(folder), dtype="float32", pp=2, mem_budget_gib=0.01, log=False) as llm:
        out = llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=(stop_at,)))[0]
        streamed = list(llm.stream(prompts[0], SamplingParams(temperature=0, max_tokens=10)))
    assert list(out.token_ids) == full[: full.index(stop_at) + 1] and out.finish_reason == "stop"
    assert [t for s in streamed for t in s.delta_token_ids] == full
    assert [s.finished for s in streamed] == [False] * 9 + [True]
