"""Speed-aware splits: the partition that is best by simulated throughput or TTFT among those that fit.

`max-kv` is the exact capacity search of `partition.py`. `max-throughput` and `min-ttft` simulate
the workload (`simulator.simulate`) on every contiguous partition when there are at most
`EXHAUSTIVE_LIMIT` of them (exact for the simulator). Otherwise they run a local search: start at
the best of the registered strategies' splits, move one layer across one stage boundary while that
improves the value (best move first). That finds a local optimum under one-layer moves, never worse
than any registered strategy; it gives no bound on the gap to the global optimum.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from pipesplit.errors import UserError
from pipesplit.planner.plan import Plan
from pipesplit.planner.simulator import SimResult

OBJECTIVES = ("max-kv", "max-throughput", "min-ttft")
SIMULATED = ("max-throughput", "min-ttft")
EXHAUSTIVE_LIMIT = 600


def check_objective(name: str) -> None:
    if name not in OBJECTIVES:
        raise UserError(f"unknown objective {name!r}; give one of {', '.join(OBJECTIVES)}")


def score(objective: str, plan: Plan, result: SimResult) -> tuple:
    """Larger is better; ties go to more KV capacity."""
    if objective == "max-throughput":
        return (result.output_tokens_per_s, -result.ttft_p50, plan.max_total_num_tokens)
    if objective == "min-ttft":
        return (-result.ttft_p50, result.output_tokens_per_s, plan.max_total_num_tokens)
    raise ValueError(f"{objective} is not a simulated objective")


def compositions(num_layers: int, num_stages: int) -> Iterator[tuple[int, ...]]:
    """Every split of num_layers into num_stages positive parts, in lexicographic order."""
    if num_stages == 1:
        yield (num_layers,)
        return
    for first in range(1, num_layers - num_stages + 2):
        for rest in compositions(num_layers - first, num_stages - 1):
            yield (first, *rest)


def num_compositions(num_layers: int, num_stages: int) -> int:
    return math.comb(num_layers - 1, num_stages - 1)


@dataclass(frozen=True)
class SearchResult:
    plan: Plan
    result: SimResult
    method: str  # "exhaustive" or "local search"
    evaluated: int  # partitions simulated


Evaluate = Callable[[tuple[int, ...]], "tuple[Plan, SimResult] | None"]  # None: does not fit


def search(objective: str, num_layers: int, num_stages: int, evaluate: Evaluate,
           starts: Sequence[Sequence[int]] = (), exhaustive_limit: int = EXHAUSTIVE_LIMIT) -> SearchResult:
    """The best partition by `objective` among those `evaluate` accepts; `starts` (the registered
    strategies' splits) seed the local search."""
    memo: dict[tuple[int, ...], tuple | None] = {}

    def value(partition: tuple[int, ...]):
        if partition not in memo:
            got = evaluate(partition)
            memo[partition] = None if got is None else (score(objective, *got), got)
        return memo[partition]

    def better(a, b) -> bool:  # a beats b (b may be None); equal scores: the earlier partition stays
        return a is not None and (b is None or a[0] > b[0])

    best = None
    if num_compositions(num_layers, num_stages) <= exhaustive_limit:
        method = "exhaustive"
        for partition in compositions(num_layers, num_stages):
            v = value(partition)
            if better(v, best):
                best = v
    else:
        method = "local search"
        for start in starts:
            v = value(tuple(start))
            if better(v, best):
                best = v
        while best is not None:
            current = best[1][0].partition
            improved = None
            for neighbour in _one_layer_moves(current):
                v = value(neighbour)
                if better(v, best) and better(v, improved):
                    improved = v
            if improved is None:
                break
            best = improved
    if best is None:
        raise UserError("no split fits these devices with this workload; add stages, memory or shorten requests")
    plan, result = best[1]
    return SearchResult(plan, result, method, sum(1 for v in memo.values()))


def _one_layer_moves(partition: Sequence[int]) -> Iterator[tuple[int, ...]]:
    for b in range(len(partition) - 1):
        for step in (1, -1):
            moved = list(partition)
            moved[b] += step
            moved[b + 1] -= step
            if moved[b] >= 1 and moved[b + 1] >= 1:
                yield tuple(moved)
