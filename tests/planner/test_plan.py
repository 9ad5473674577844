"""make_plan / compare on hand-made cost models and one real model."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from pipesplit.errors import UserError
from pipesplit.planner.costs import CostModel
from pipesplit.planner.hardware import Device, GiB, usable_bytes
from pipesplit.planner.partition import STRATEGIES
from pipesplit.planner.plan import EXPLICIT, Plan, compare, make_plan, stage_kv_tokens

COST = CostModel(
    layer_weight_bytes=(10, 10, 12, 12, 12, 12, 12, 12),
    embedding_bytes=7,
    head_bytes=9,
    tied_head_bytes=1,
    mtp_bytes=4,
    kv_bytes_per_token_per_layer=1,
)


def devices(*sizes: int) -> list[Device]:
    return [Device(f"d{size}", size) for size in sizes]


def plan(cost=COST, devs=None, **kw) -> Plan:
    kw.setdefault("mem_fraction", 1.0)
    kw.setdefault("reserve_gib", 0.0)
    return make_plan(cost, devs or devices(100, 100, 100), model="toy", **kw)


def test_stage_kv_tokens_formula():
    assert stage_kv_tokens(100, 40, 3, 2) == 10
    assert stage_kv_tokens(100, 120, 3, 2) == 0


def test_stage_weights_include_embedding_head_and_mtp():
    p = plan(partition="2,3,3")
    assert [st.layers for st in p.stages] == [(0, 2), (2, 5), (5, 8)]
    assert [st.weight_bytes for st in p.stages] == [10 + 10 + 7, 36, 36 + 9 + 4]
    assert [(st.embedding, st.lm_head, st.mtp) for st in p.stages] == [
        (True, False, False),
        (False, False, False),
        (False, True, True),
    ]
    assert p.strategy == EXPLICIT and p.partition == (2, 3, 3)


def test_single_stage_holds_the_tied_head_only():
    p = plan(devs=devices(200), partition="8")
    assert p.stages[0].weight_bytes == sum(COST.layer_weight_bytes) + 7 + 1 + 4
    assert p.stages[0].embedding and p.stages[0].lm_head


def test_binding_stage_has_the_fewest_tokens():
    p = plan(partition="2,3,3")
    tokens = [st.kv_tokens for st in p.stages]
    assert tokens == [(100 - 27) // 2, (100 - 36) // 3, (100 - 49) // 3]
    assert p.max_total_num_tokens == min(tokens) and p.binding_stage == tokens.index(min(tokens))
    assert p.fits


def test_usable_bytes_come_from_mem_fraction_and_reserve():
    devs = [Device("big", 80 * GiB)]
    p = make_plan(COST, devs, partition="8", mem_fraction=0.5, reserve_gib=1.0)
    assert p.stages[0].capacity_bytes == 80 * GiB
    assert p.stages[0].usable_bytes == usable_bytes(80 * GiB, 0.5, 1.0) == 39 * GiB


def test_default_strategy_is_max_kv_and_beats_every_strategy():
    plans = compare(COST, devices(90, 60, 100), mem_fraction=1.0, reserve_gib=0.0)
    assert [p.strategy for p in plans] == list(STRATEGIES)
    best = plan(devs=devices(90, 60, 100))
    assert best.strategy == "max-kv"
    assert all(best.max_total_num_tokens >= p.max_total_num_tokens for p in plans)


def test_a_split_that_does_not_fit_is_reported_not_raised():
    plans = {p.strategy: p for p in compare(COST, devices(60, 60, 40), mem_fraction=1.0, reserve_gib=0.0)}
    legacy = plans["sglang-legacy"]  # 2,2,4: last stage 48 + 13 bytes > 40
    assert legacy.partition == (2, 2, 4)
    assert not legacy.fits and legacy.max_total_num_tokens == 0 and legacy.binding_stage == 2
    assert plans["max-kv"].fits


def test_reorder_finds_the_best_device_order():
    devs = devices(40, 100, 60, 100)
    cost = dataclasses.replace(COST, head_bytes=30)
    best = plan(cost, devs, reorder=True)
    by_order = [plan(cost, list(order)).max_total_num_tokens for order in itertools.permutations(devs)]
    assert best.max_total_num_tokens == max(by_order)
    assert best.max_total_num_tokens > plan(cost, devs).max_total_num_tokens
    assert sorted(st.gpu for st in best.stages) == sorted(d.name for d in devs)


@pytest.mark.parametrize("target", ["pipesplit", "sglang"])
def test_targets(target):
    p = plan(devs=devices(90, 60, 100), target=target)
    assert p.target == target and p.fits


def test_bad_inputs_are_user_errors():
    with pytest.raises(UserError, match="unknown strategy 'fastest'"):
        plan(strategy="fastest")
    with pytest.raises(UserError, match="unknown target"):
        plan(target="trtllm")
    with pytest.raises(UserError, match="more than the model's 8 layers"):
        plan(devs=devices(*[100] * 9))
    with pytest.raises(UserError, match="sums to 7 but the model has 8 layers; give 3 numbers that sum to 8"):
        plan(partition="2,2,3")


def test_plan_is_frozen():
    p = plan()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.partition = (1, 1, 6)  # type: ignore[misc]


def test_real_model_stage_weights_add_up_to_the_cost_model():
    from pipesplit.planner.costs import cost_model
    from pipesplit.planner.spec import load_spec

    cost = cost_model(load_spec("deepseek-v3"), mtp=True)
    p = make_plan(cost, [Device("H200", 143771 * 2**20)] * 8)
    total = sum(cost.layer_weight_bytes) + cost.embedding_bytes + cost.head_bytes + cost.mtp_bytes
    assert sum(st.weight_bytes for st in p.stages) == total
    assert p.stages[-1].mtp and not p.stages[0].mtp
    assert p.stages[-1].layers[1] == 61 and p.fits


def test_planner_imports_without_torch_or_numpy():
    import subprocess
    import sys

    code = (
        "import sys, pipesplit.planner.report, pipesplit.planner.plan, pipesplit.planner.partition, pipesplit.planner.hardware; "
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
