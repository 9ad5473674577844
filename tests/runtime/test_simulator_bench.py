"""bench/simulator.py's pooled orders: the sign-flip p-value against brute-force enumeration, and
the verdicts on made-up results files whose orders are known."""

from __future__ import annotations

import importlib.util
import itertools
import random
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

BENCH = Path(__file__).resolve().parents[2] / "bench" / "simulator.py"
spec = importlib.util.spec_from_file_location("simulator_bench", BENCH)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def brute_force_p_value(diffs: list[float]) -> float:
    observed = abs(sum(diffs))
    patterns = list(itertools.product((1, -1), repeat=len(diffs)))
    return sum(abs(sum(s * d for s, d in zip(signs, diffs))) >= observed for signs in patterns) / len(patterns)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-20, 20).map(float), min_size=1, max_size=11))
def test_sign_flip_p_value_is_the_brute_force_count(diffs):
    # whole numbers: every signed sum is exact, so both counts see the same ties
    assert bench.sign_flip_p_value(diffs) == brute_force_p_value(diffs)


def test_sign_flip_p_value_of_agreeing_rounds():
    assert bench.sign_flip_p_value([0.1] * 5) == 2 / 32  # only all-plus and all-minus reach it
    assert bench.sign_flip_p_value([0.1, -0.1]) == 1.0
    assert bench.sign_flip_p_value([0.05, 0.1]) == 0.5  # two rounds never give an order


def made_up_file(rng: random.Random, simulated_c: float) -> dict:
    """Three PP2 splits: A 10% faster than B in every round, C as fast as A give or take 3%; the
    simulator puts A above B, and C at `simulated_c` x A."""
    truth = {(15, 15): 110.0, (6, 24): 100.0, (24, 6): 110.0}
    simulated = {(15, 15): 105.0, (6, 24): 95.0, (24, 6): 105.0 * simulated_c}
    rows = []
    for split, value in truth.items():
        rounds = [{"output_tokens_per_s": value * rng.uniform(0.97, 1.03), "ttft_p50": 1.0} for _ in range(2)]
        rows.append({"pp": 2, "workload": "all-at-once", "partition": list(split), "rounds": rounds,
                     "measured": rounds[0], "simulated": {"output_tokens_per_s": simulated[split], "ttft_p50": 1.0}})
    return {"rows": rows}


def test_pooled_orders_finds_the_real_order_and_judges_the_simulator():
    rng = random.Random(1)
    result = bench.pooled_orders([made_up_file(rng, simulated_c=1.2) for _ in range(4)])
    by_pair = {tuple(map(tuple, p["splits"])): p for p in result["pairs"] if p["by"] == "output_tokens_per_s"}
    a_b, a_c, b_c = by_pair[(15, 15), (6, 24)], by_pair[(15, 15), (24, 6)], by_pair[(6, 24), (24, 6)]
    assert a_b["rounds"] == 8 and a_b["p_value"] == 2 / 2**8 and a_b["measured_order"] and a_b["ordered_alike"]
    assert b_c["measured_order"] and b_c["ordered_alike"]
    assert not a_c["measured_order"]  # within 3% of each other: no order to get right or wrong
    ttft = [p for p in result["pairs"] if p["by"] == "ttft_p50"]
    assert ttft and not any(p["measured_order"] for p in ttft)  # identical TTFTs: p = 1
    summary = result["summary"]
    assert (summary["pairs"], summary["measured_orders"], summary["measured_orders_simulated_alike"]) == (6, 2, 2)

    wrong = bench.pooled_orders([made_up_file(rng, simulated_c=0.8) for _ in range(4)])  # C below B now
    assert wrong["summary"]["measured_orders_simulated_alike"] == 1
    ranking = next(r for r in wrong["rankings"] if r["by"] == "output_tokens_per_s")
    assert ranking["measured"][-1] == [6, 24] and ranking["simulated"] == [[15, 15], [6, 24], [24, 6]]
    assert (ranking["runs"], ranking["runs_simulated_as_pooled"]) == (4, 0)  # no file's simulation puts B last
