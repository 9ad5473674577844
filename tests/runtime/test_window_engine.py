"""Sliding-window models through the engine: stage processes on gloo, the window pool, planner parity.

Rank 0 allocates the window pool's slots and releases them as each request's window slides; the
stages follow the step messages. Each stage's measured capacity equals the plan's (one rule,
`partition.kv_capacity`), the window pool makes the pipeline hold more tokens than charging
windowed layers in full, and greedy outputs equal transformers' with far fewer window slots than
the positions the requests pass through.
"""

from __future__ import annotations

import random

import pytest

from pipesplit import LLM, SamplingParams
from pipesplit.planner.partition import window_pool_slots
from pipesplit.planner.plan import window_pool_for
from pipesplit.planner.spec import load_spec
from pipesplit.runtime.plan_bridge import runtime_plan
from tests.runtime.test_models import hf_greedy

GiB = 1 << 30
LIMITS = dict(max_running_requests=6, max_batch_tokens=48, chunked_prefill_size=8)  # a small window pool


def _workload(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(256) for _ in range(rng.randint(3, 30))] for _ in range(n)]


# mistral_window: every layer windowed, so its pipeline holds max_running_requests x
# max_position_embeddings tokens (what the scheduler can use) once its window pools fit; a budget
# small enough that the full charge holds fewer
@pytest.mark.parametrize("name,pp,partition,budget_gib", [("gpt_oss", 2, "1,3", 0.004), ("mistral_window", 3, None, 0.0008),
                                                          ("qwen2_window", 2, "2,2", 0.004),
                                                          ("gemma3", 2, "2,3", 0.004)])
def test_window_pool_capacity_equals_the_plan_and_outputs_equal_transformers(
        tiny_window_checkpoints, name, pp, partition, budget_gib):
    folder = str(tiny_window_checkpoints[name])
    spec = load_spec(folder)
    budgets = (int(budget_gib * GiB),) * pp
    pool = window_pool_for(spec, LIMITS["max_running_requests"], LIMITS["max_batch_tokens"], pp)
    assert pool.slots == window_pool_slots(spec.sliding_window, 6, 48, pp) == 6 * (spec.sliding_window - 1) + pp * 48
    predicted = runtime_plan(spec, pp, None, partition, "float32", budgets, window_pool=pool)
    full_charge = runtime_plan(spec, pp, None, predicted.partition, "float32", budgets)
    assert predicted.window_slots == pool.slots
    assert predicted.max_total_num_tokens > full_charge.max_total_num_tokens  # what the window pool is for
    prompts = _workload(10)
    with LLM(folder, pp=pp, partition=partition, mem_budget_gib=budget_gib, dtype="float32", log=False,
             **LIMITS) as llm:
        assert f"pool of {pool.slots} slots" in llm.startup_report()
        assert llm.plan == predicted
        assert llm.max_total_num_tokens == predicted.max_total_num_tokens
        assert llm.engine.window_slots == predicted.window_slots
        for stage, report in zip(predicted.stages, llm.stage_reports):
            assert report.param_bytes == stage.weight_bytes
            assert report.kv_tokens == stage.kv_tokens
        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10))
        windows = llm.engine.scheduler.windows
        assert windows.slots.num_used == 0 and llm.engine.usage()["kv_tokens_used"] == 0
    assert sum(len(p) + 10 for p in prompts) > pool.slots  # window slots were reused
    assert [list(o.token_ids) for o in outputs] == hf_greedy(folder, prompts, 10)
