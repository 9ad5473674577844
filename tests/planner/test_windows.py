"""Sliding-window layers in the planner: the window pool's size, the capacity rule shared with the
runtime (`kv_capacity`), and max-kv against brute force over both ways of storing windowed layers."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipesplit.planner.costs import cost_model
from pipesplit.planner.hardware import resolve_devices
from pipesplit.planner.partition import (
    SplitProblem,
    evaluate,
    kv_capacity,
    max_kv,
    window_pool_slots,
    windowed_stage_kv_tokens,
)
from pipesplit.planner.plan import WindowPool, make_plan
from pipesplit.planner.spec import load_spec
from tests.planner.test_partition import compositions


def test_window_pool_slots_cover_every_running_request_and_the_steps_in_flight():
    assert window_pool_slots(128, 256, 2048, 2) == 256 * 127 + 2 * 2048
    assert window_pool_slots(1, 4, 8, 3) == 24  # a window of 1: only the new tokens are kept
    with pytest.raises(ValueError, match="max_running_requests"):
        window_pool_slots(128, 0, 2048, 2)


def test_kv_capacity_by_hand():
    kv = 10
    # stage 0: 1 windowed layer only; stage 1: 1 windowed + 2 full layers
    usable, weights, full, windowed = (10_000, 20_000), (1_000, 2_000), (0, 2), (1, 1)
    charged = kv_capacity(usable, weights, full, windowed, kv)
    assert charged.stage_tokens == (9_000 // 10, 18_000 // 30) and charged.max_total_num_tokens == 600
    assert charged.window_slots == 600  # the windowed layers' pool is as large as the token pool
    pooled = kv_capacity(usable, weights, full, windowed, kv, window_slots=100, token_limit=5_000)
    # stage 1: (20000 - 2000 - 1 * 10 * 100) / (2 * 10) = 850; stage 0 holds no per-token KV
    assert pooled.max_total_num_tokens == 850 and pooled.window_slots == 100
    assert pooled.stage_tokens == (5_000, 850)
    # a window pool larger than what it saves: the full charge is kept
    assert kv_capacity(usable, weights, full, windowed, kv, window_slots=900, token_limit=5_000) == charged
    # every layer windowed: the pipeline holds token_limit once the window pools fit
    assert kv_capacity(usable, weights, (0, 0), (1, 3), kv, 100, 5_000).max_total_num_tokens == 5_000
    assert windowed_stage_kv_tokens(1_000, 900, 0, 1, kv, 100, 5_000) == 0  # its window pool does not fit
    no_windows = kv_capacity(usable, weights, (1, 3), (0, 0), kv, 100, 5_000)
    assert no_windows.window_slots == 0 and no_windows.max_total_num_tokens == 600


def _brute_force_capacity(problem: SplitProblem, partition) -> int:
    """From the definitions, independently of kv_capacity: the better of the full charge and the
    window pool; stages of windowed layers only are not bounded by tokens."""
    kv, slots, start = problem.kv_bytes_per_token_per_layer, problem.window_slots, 0
    charged, pooled = [], []
    for s, n in enumerate(partition):
        layers = range(start, start + n)
        free = problem.usable_bytes[s] - sum(problem.layer_weight_bytes[i] for i in layers) - problem.stage_extra_bytes[s]
        windowed = sum(problem.window_layers[i] for i in layers)
        charged.append(max(0, free) // (n * kv))
        rest = free - windowed * kv * slots
        if rest < 0:
            pooled.append(0)
        elif n > windowed:
            pooled.append(rest // ((n - windowed) * kv))
        start += n
    best = min(charged)
    if slots and any(problem.window_layers):
        best = max(best, min(pooled) if pooled else problem.token_limit)
    return best


@st.composite
def windowed_problems(draw):
    rng = random.Random(draw(st.integers(0, 2**32)))
    num_layers = rng.randint(1, 9)
    num_stages = rng.randint(1, min(num_layers, 4))
    kv = rng.randint(1, 4)
    weights = tuple(rng.randint(0, 40) for _ in range(num_layers))
    extras = tuple(rng.randint(0, 40) for _ in range(num_stages))
    need = (sum(weights) + sum(extras)) // num_stages + kv * num_layers * 20
    usable = tuple(rng.randint(need // 2, 4 * need) for _ in range(num_stages))
    window_layers = tuple(rng.random() < 0.6 for _ in range(num_layers))
    return SplitProblem(weights, usable, extras, kv, window_layers=window_layers,
                        window_slots=rng.randint(1, 30), token_limit=rng.randint(1, 400))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(windowed_problems())
def test_max_kv_is_optimal_with_a_window_pool(problem):
    best = max(_brute_force_capacity(problem, p) for p in compositions(problem.num_layers, problem.num_stages))
    chosen = max_kv(problem.num_layers, problem.num_stages, problem)
    assert evaluate(problem, chosen).max_total_num_tokens == best
    for p in compositions(problem.num_layers, problem.num_stages):
        assert evaluate(problem, p).max_total_num_tokens == _brute_force_capacity(problem, p)


@pytest.mark.parametrize("pp,gpu,at_least", [(2, "H100", 1.9), (4, "L40S", 1.7)])
def test_gpt_oss_holds_nearly_twice_the_tokens_with_its_window_pool(pp, gpu, at_least):
    """Half of gpt-oss's layers have a 128-token window: with the pool they store 36-41k slots
    instead of a slot per token, and the full layers get the memory."""
    spec = load_spec("gpt-oss-120b")
    cost, devices = cost_model(spec), resolve_devices(gpu, None, pp)
    pool = WindowPool.for_scheduler(spec.sliding_window, spec.max_position_embeddings, 256, 2048, pp)
    charged = make_plan(cost, devices, model=spec.name)
    pooled = make_plan(cost, devices, model=spec.name, window_pool=pool)
    assert charged.window_slots == charged.max_total_num_tokens  # charged in full: a slot per token
    assert pooled.window_slots == pool.slots == 256 * 127 + pp * 2048
    assert pooled.max_total_num_tokens >= at_least * charged.max_total_num_tokens
    for stage in pooled.stages:  # each stage: 9 or 18 layers, half of them windowed
        full = sum(t == "full_attention" for t in spec.layer_types[stage.layers[0]:stage.layers[1]])
        windowed = stage.num_layers - full
        kv = cost.kv_bytes_per_token_per_layer
        assert stage.kv_tokens == (stage.usable_bytes - stage.weight_bytes - windowed * kv * pool.slots) // (full * kv)
    assert make_plan(cost, devices, target="sglang", model=spec.name, window_pool=pool) == make_plan(
        cost, devices, target="sglang", model=spec.name)  # SGLang's rule charges windowed layers in full
