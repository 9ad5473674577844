"""The plan: for every pipeline stage its layer range, what else it holds, its weights and KV capacity.

`make_plan` is a pure function of (cost model, devices, strategy or partition, target); the planner
CLI prints its result and the runtime builds its stages from the same object.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pipesplit.errors import UserError
from pipesplit.planner.costs import CostModel
from pipesplit.planner.engines import EngineModel
from pipesplit.planner.hardware import DEFAULT_RESERVE_GIB, Device, distinct_orders, find_gpu_or_none, usable_bytes
from pipesplit.planner.partition import (
    DEFAULT_STRATEGY,
    STRATEGIES,
    SplitProblem,
    check_stage_count,
    check_strategy,
    check_target,
    evaluate,
    parse_partition,
    partition_for,
    stage_kv_tokens,
    stage_ranges,
    window_pool_slots,
)
from pipesplit.planner.spec import ModelSpec

__all__ = [
    "StagePlan",
    "Plan",
    "make_plan",
    "compare",
    "stage_kv_tokens",
    "partition_for",
    "split_problem",
    "stage_extra_bytes",
    "EXPLICIT",
    "MAX_REORDERS",
    "WindowPool",
    "window_pool_for",
    "DEFAULT_MAX_BATCH_TOKENS",
    "DEFAULT_MAX_RUNNING_REQUESTS",
]

EXPLICIT = "explicit"
"""Plan.strategy of a plan built from a user-given partition."""

MAX_REORDERS = 5040
"""--reorder tries at most this many distinct device orders."""


@dataclass(frozen=True)
class StagePlan:
    stage: int
    gpu: str
    capacity_bytes: int
    usable_bytes: int
    layers: tuple[int, int]  # (start, end) global decoder-layer indices, end exclusive
    embedding: bool
    lm_head: bool  # final norm + lm_head (a tied model's single stage holds only the norm extra)
    mtp: bool
    weight_bytes: int
    kv_tokens: int
    overhead_bytes: int = 0  # capacity the engine does not give to weights and KV (capacity - usable)
    kv_bytes_per_token: int = 0  # KV bytes one token costs on this stage, as its engine allocates them
    kv_bytes: int = 0  # the stage's KV pool at the pipeline's max_total_num_tokens

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]


@dataclass(frozen=True)
class Plan:
    model: str
    strategy: str
    target: str
    partition: tuple[int, ...]
    max_total_num_tokens: int
    fits: bool
    binding_stage: int | None  # stage with the fewest KV tokens, or the stage that does not fit
    stages: tuple[StagePlan, ...]
    engine: str = "pipesplit"
    memory_fraction: float = 0.9  # the fraction the engine uses (its flag or its default)
    window_slots: int = 0  # slots of the sliding-window layers' own pool (0: none, or charged in full)


def stage_extra_bytes(cost: CostModel, num_stages: int) -> tuple[int, ...]:
    """Bytes each stage holds besides its decoder layers: embedding first, head (+ MTP) last."""
    if num_stages == 1:
        return (cost.embedding_bytes + cost.tied_head_bytes + cost.mtp_bytes,)
    middle = (0,) * (num_stages - 2)
    return (cost.embedding_bytes, *middle, cost.head_bytes + cost.mtp_bytes)


def stage_speeds(devices: Sequence[Device]) -> tuple[float, ...]:
    """Dense BF16 TFLOPS of each catalog device; all equal when any device is custom."""
    speeds = []
    for device in devices:
        gpu = find_gpu_or_none(device.name)
        if gpu is None:
            return (1.0,) * len(devices)
        speeds.append(gpu.bf16_tflops)
    return tuple(speeds)


# The runtime scheduler's defaults (runtime.scheduler.SchedulerConfig, `LLM` and the CLI read them
# here): plans of the runtime's own window pool assume them.
DEFAULT_MAX_RUNNING_REQUESTS = 256
DEFAULT_MAX_BATCH_TOKENS = 2048


@dataclass(frozen=True)
class WindowPool:
    """The sliding-window pool a runtime gives its windowed layers: `slots` (`window_pool_slots`
    of its scheduler limits) and the most tokens it lets a pipeline of windowed layers only hold."""

    slots: int
    token_limit: int

    def __post_init__(self) -> None:
        if self.slots < 1 or self.token_limit < 1:
            raise ValueError(f"a window pool needs positive slots and token_limit, got {self.slots} and "
                             f"{self.token_limit}")

    @classmethod
    def for_scheduler(cls, window: int, max_position_embeddings: int, max_running_requests: int,
                      max_batch_tokens: int, micro_batches: int) -> "WindowPool":
        slots = window_pool_slots(window, max_running_requests, max_batch_tokens, micro_batches)
        return cls(slots, max_running_requests * max_position_embeddings)


def _stage_kv_bytes(problem: SplitProblem, result, layers: tuple[int, int]) -> int:
    """A stage's KV pool at the pipeline's capacity; with a window pool its windowed layers hold
    the pool's slots instead of a slot per token."""
    if result.window_slots and problem.kv_allocator == "uniform":
        windowed = sum(problem.window_layers[layers[0]:layers[1]]) if problem.window_layers else 0
        full = layers[1] - layers[0] - windowed
        return (result.max_total_num_tokens * full + result.window_slots * windowed) * problem.kv_bytes_per_token_per_layer
    return int(result.max_total_num_tokens * problem.stage_kv_cell(*layers))


def split_problem(
    cost: CostModel,
    usable: Sequence[int],
    target: str = "pipesplit",
    speeds: Sequence[float] = (),
    window_pool: WindowPool | None = None,
    **layout,
) -> SplitProblem:
    """The partition problem; layout: the engine's KV allocator (see engines.kv_layout); window_pool:
    the runtime's sliding-window pool (pipesplit target)."""
    num_stages = len(usable)
    windowed = window_pool is not None and any(cost.window_layers)
    return SplitProblem(
        layer_weight_bytes=tuple(cost.layer_weight_bytes),
        usable_bytes=tuple(usable),
        stage_extra_bytes=stage_extra_bytes(cost, num_stages),
        kv_bytes_per_token_per_layer=cost.kv_bytes_per_token_per_layer,
        target=target,
        layer_flops=tuple(cost.layer_flops_per_token),
        stage_extra_flops=(0,) * (num_stages - 1) + (cost.head_flops_per_token,) if cost.layer_flops_per_token else (),
        stage_speed=tuple(speeds),
        window_layers=tuple(cost.window_layers),
        window_slots=window_pool.slots if windowed else 0,
        token_limit=window_pool.token_limit if windowed else 0,
        **layout,
    )


def _plan_for_order(
    model: str,
    cost: CostModel,
    devices: Sequence[Device],
    choice: str | tuple[int, ...],
    target: str,
    mem_fraction: float,
    reserve_gib: float,
    engine: EngineModel | None = None,
    window_pool: WindowPool | None = None,
) -> Plan:
    if engine is None:
        usable = [usable_bytes(d.capacity_bytes, mem_fraction, reserve_gib) for d in devices]
        layout, fraction = {"target": target}, mem_fraction
    else:
        usable = [o.usable for o in engine.overheads(tuple(devices), mem_fraction, reserve_gib)]
        layout, fraction = engine.layout(), engine.fraction(tuple(devices), mem_fraction)
    target = layout.pop("target")
    problem = split_problem(cost, usable, target, stage_speeds(devices), window_pool, **layout)
    num_layers, num_stages = problem.num_layers, problem.num_stages
    partition = partition_for(choice, num_layers, num_stages, problem)
    result = evaluate(problem, partition)
    last = num_stages - 1
    stages = tuple(
        StagePlan(
            stage=s,
            gpu=device.name,
            capacity_bytes=device.capacity_bytes,
            usable_bytes=usable[s],
            layers=layers,
            embedding=s == 0,
            lm_head=s == last,
            mtp=s == last and cost.mtp_bytes > 0,
            weight_bytes=result.stage_weight_bytes[s],
            kv_tokens=result.stage_tokens[s],
            overhead_bytes=device.capacity_bytes - usable[s],
            kv_bytes_per_token=-(-problem.stage_kv_cell(*layers) // 1),
            kv_bytes=_stage_kv_bytes(problem, result, layers),
        )
        for s, (device, layers) in enumerate(zip(devices, stage_ranges(partition)))
    )
    return Plan(
        model=model,
        strategy=choice if isinstance(choice, str) else EXPLICIT,
        target=target,
        partition=partition,
        max_total_num_tokens=result.max_total_num_tokens,
        fits=result.fits,
        binding_stage=result.binding_stage,
        stages=stages,
        engine=engine.engine if engine is not None else "pipesplit",
        memory_fraction=fraction,
        window_slots=result.window_slots,
    )


def _shortfall(plan: Plan, cost: CostModel) -> int:
    """Bytes the worst stage lacks to hold its weights and one token (<= 0 when it fits)."""
    kv = cost.kv_bytes_per_token_per_layer
    return max(st.weight_bytes + st.num_layers * kv - st.usable_bytes for st in plan.stages)


def make_plan(
    cost: CostModel,
    devices: Sequence[Device],
    strategy: str | None = None,
    partition: str | Sequence[int] | None = None,
    target: str = "pipesplit",
    reorder: bool = False,
    mem_fraction: float = 0.9,
    reserve_gib: float = DEFAULT_RESERVE_GIB,
    model: str = "",
    engine: EngineModel | None = None,
    window_pool: WindowPool | None = None,
) -> Plan:
    """The plan for one strategy (default max-kv) or an explicit partition on these devices.

    With reorder, every distinct order of the devices is tried and the best kept (most KV tokens;
    when nothing fits, the least shortfall); the given order wins ties. window_pool: the runtime's
    sliding-window pool (pipesplit target); None charges windowed layers a full KV cache.
    """
    check_target(target)
    num_layers, num_stages = len(cost.layer_weight_bytes), len(devices)
    check_stage_count(num_layers, num_stages)
    if partition is not None and strategy is not None:
        raise UserError("give --strategy or --partition, not both")
    if partition is not None:
        choice: str | tuple[int, ...] = parse_partition(partition, num_layers, num_stages)
    else:
        choice = strategy or DEFAULT_STRATEGY
        check_strategy(choice)
    orders = distinct_orders(tuple(devices), MAX_REORDERS) if reorder else [tuple(devices)]
    best: Plan | None = None
    best_key = None
    for order in orders:
        plan = _plan_for_order(model, cost, order, choice, target, mem_fraction, reserve_gib, engine, window_pool)
        key = (plan.max_total_num_tokens, -_shortfall(plan, cost))
        if best_key is None or key > best_key:
            best, best_key = plan, key
    assert best is not None
    return best


def compare(
    cost: CostModel,
    devices: Sequence[Device],
    target: str = "pipesplit",
    reorder: bool = False,
    mem_fraction: float = 0.9,
    reserve_gib: float = DEFAULT_RESERVE_GIB,
    model: str = "",
    partition: str | Sequence[int] | None = None,
    engine: EngineModel | None = None,
    window_pool: WindowPool | None = None,
) -> tuple[Plan, ...]:
    """One plan per registered strategy (and the explicit partition, if given), in registry order."""
    common = (target, reorder, mem_fraction, reserve_gib, model, engine, window_pool)
    plans = [make_plan(cost, devices, name, None, *common) for name in STRATEGIES]
    if partition is not None:
        plans.append(make_plan(cost, devices, None, partition, *common))
    return tuple(plans)


def window_pool_for(
    spec: ModelSpec,
    max_running_requests: int = DEFAULT_MAX_RUNNING_REQUESTS,
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    micro_batches: int = 1,
) -> WindowPool | None:
    """The window pool of a runtime with these scheduler limits, or None without windowed layers."""
    if "sliding_attention" not in spec.layer_types:
        return None
    return WindowPool.for_scheduler(spec.sliding_window, spec.max_position_embeddings, max_running_requests,
                                    max_batch_tokens, micro_batches)
