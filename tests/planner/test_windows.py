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


# -- Gemma configs as the Hub writes them -------------------------------------------------------------
GEMMA3_1B = {  # google/gemma-3-1b-it's text config keys (no layer_types: sliding_window_pattern)
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 1152,
    "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1,
    "head_dim": 256, "vocab_size": 262144, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "rope_scaling": None, "sliding_window": 512,
    "sliding_window_pattern": 6, "query_pre_attn_scalar": 256, "final_logit_softcapping": None,
    "attn_logit_softcapping": None, "hidden_activation": "gelu_pytorch_tanh", "torch_dtype": "bfloat16",
}
GEMMA2_9B = {
    "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 3584, "intermediate_size": 14336,
    "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
    "vocab_size": 256000, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
    "sliding_window": 4096, "query_pre_attn_scalar": 256, "final_logit_softcapping": 30.0,
    "attn_logit_softcapping": 50.0, "hidden_activation": "gelu_pytorch_tanh", "torch_dtype": "float32",
}


def test_gemma_configs_parse_into_interleaved_layers_soft_caps_and_two_ropes():
    from pipesplit.planner.spec import spec_from_config

    g3 = spec_from_config(GEMMA3_1B)
    assert (g3.family, g3.qk_norm, g3.tie_word_embeddings, g3.sliding_window) == ("gemma", True, True, 512)
    assert [i for i, t in enumerate(g3.layer_types) if t == "full_attention"] == [5, 11, 17, 23]
    assert (g3.rope_theta, g3.gemma.local_rope_theta, g3.gemma.query_pre_attn_scalar) == (1e6, 1e4, 256)
    assert g3.gemma.attn_logit_softcapping is None and g3.gemma.final_logit_softcapping is None
    g2 = spec_from_config(GEMMA2_9B)
    assert g2.layer_types[:4] == ("sliding_attention", "full_attention") * 2 and not g2.qk_norm
    assert (g2.gemma.attn_logit_softcapping, g2.gemma.final_logit_softcapping, g2.gemma.local_rope_theta) == (
        50.0, 30.0, None)
    # the windowed half of Gemma 2's layers: with a 4096-token window a pool sized for 256 running
    # requests is larger than what the full charge holds, so the plan keeps the full charge
    cost, devices = cost_model(g2), resolve_devices("H100", None, 2)
    pool = WindowPool.for_scheduler(4096, 8192, 256, 2048, 2)
    assert make_plan(cost, devices, window_pool=pool).max_total_num_tokens == make_plan(
        cost, devices).max_total_num_tokens


def test_gemma_with_another_activation_is_a_user_error():
    from pipesplit.errors import UserError
    from pipesplit.planner.spec import spec_from_config

    with pytest.raises(UserError, match="hidden_activation"):
        spec_from_config({**GEMMA2_9B, "hidden_activation": "silu"})


def test_plan_command_plans_the_runtimes_window_pool():
    """`pipesplit plan` (--engine pipesplit) gives windowed layers the runtime's pool at its default
    scheduler limits; the stage KV bytes it prints hold the pool's slots, not a slot per token."""
    import json
    import subprocess
    import sys

    from pipesplit.planner.plan import window_pool_for

    out = subprocess.run([sys.executable, "-m", "pipesplit", "plan", "gpt-oss-120b", "--pp", "2", "--gpu", "H100",
                          "--json"], capture_output=True, text=True, check=True).stdout
    printed = json.loads(out)["plans"][0]
    spec = load_spec("gpt-oss-120b")
    cost, devices = cost_model(spec), resolve_devices("H100", None, 2)
    expected = make_plan(cost, devices, model=spec.name, window_pool=window_pool_for(spec, micro_batches=2))
    charged = make_plan(cost, devices, model=spec.name)
    assert printed["max_total_num_tokens"] == expected.max_total_num_tokens > 1.9 * charged.max_total_num_tokens
    kv = cost.kv_bytes_per_token_per_layer
    for stage in printed["stages"]:
        start, end = stage["layers"]
        windowed = sum(t == "sliding_attention" for t in spec.layer_types[start:end])
        full = end - start - windowed
        assert stage["kv_bytes"] == (expected.max_total_num_tokens * full + expected.window_slots * windowed) * kv
        assert stage["kv_bytes"] + stage["weight_bytes"] <= stage["usable_bytes"]
