"""The planner, asked the runtime's question: which layers each stage process holds.

The runtime's weights and KV cache are in its load dtype, and each stage's memory budget is what
the process may use (CPU: `--mem-budget`; CUDA: the device memory under `--mem-fraction`). The
plan built here is the object the stages are built from, and its `kv_tokens` are what the stages
will measure after loading (a test holds the two equal).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from pipesplit.errors import UserError
from pipesplit.planner.costs import cost_model
from pipesplit.planner.hardware import Device
from pipesplit.planner.plan import Plan, WindowPool, make_plan
from pipesplit.planner.spec import ModelSpec

GiB = 1 << 30
# Without --mem-budget a CPU stage gets a share of the available RAM, capped so that a default
# run does not zero gigabytes of KV pool it will never use.
DEFAULT_CPU_SHARE = 0.25
DEFAULT_CPU_CAP_GIB = 2.0


def available_ram_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def budgets_for(spec: ModelSpec, pp: int, device: str, mem_budget_gib: float | None, mem_fraction: float) -> tuple[int, ...]:
    """Per-stage bytes for weights plus KV cache, as the planner sees them."""
    if pp < 1:
        raise UserError(f"--pp is {pp}; give at least 1")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--device cuda but no CUDA device is visible; use --device cpu")
        total = torch.cuda.get_device_properties(0).total_memory
        sharing = -(-pp // torch.cuda.device_count())  # more stages than GPUs: they split each GPU
        return (int(total * mem_fraction / sharing),) * pp
    if mem_budget_gib is not None:
        if mem_budget_gib <= 0:
            raise UserError(f"--mem-budget is {mem_budget_gib:g} GiB; give a positive size")
        return (int(mem_budget_gib * GiB),) * pp
    share = min(available_ram_bytes() * DEFAULT_CPU_SHARE / pp, DEFAULT_CPU_CAP_GIB * GiB)
    return (int(share),) * pp


def packs_tied_head(spec: ModelSpec, device: str, dtype: str) -> bool:
    """Whether a CPU stage holding the embedding and a head tied to it (PP1) gives the head its own
    packed copy of the weight: oneDNN's packed GEMM of SmolLM2's head at 1-64 rows measured
    2.1-2.4x faster than the plain one in bfloat16 (0.94-1.9x in float32, on an AMX Xeon), and
    the embedding lookup needs the plain layout. The copy costs the head's bytes once
    more (SmolLM2: 57 MB in bfloat16), which the plan then charges."""
    if device != "cpu" or not spec.tie_word_embeddings:
        return False
    import torch

    from pipesplit.runtime.models.layers import can_pack
    from pipesplit.runtime.stage import DTYPES

    return dtype in DTYPES and can_pack(torch.empty(1, 1, dtype=DTYPES[dtype]))


def runtime_plan(
    spec: ModelSpec,
    pp: int,
    strategy: str | None,
    partition: str | Sequence[int] | None,
    dtype: str,
    budgets: Sequence[int],
    mtp: bool = False,
    window_pool: WindowPool | None = None,
    packed_tied_head: bool = False,
) -> Plan:
    """The plan the stage processes are built from (default strategy: max-kv); window_pool: the
    sliding-window pool the runtime gives windowed layers (`window_pool_for`); packed_tied_head:
    a stage holding the embedding and a head tied to it holds the head's weight a second time
    (`packs_tied_head`)."""
    cost = cost_model(spec, tp=1, kv_dtype=dtype, mtp=mtp, weight_dtype=dtype)
    if packed_tied_head and spec.tie_word_embeddings:
        cost = dataclasses.replace(cost, tied_head_bytes=cost.head_bytes)
    devices = [Device("budget", b) for b in budgets]
    return make_plan(
        cost,
        devices,
        strategy=strategy,
        partition=partition,
        mem_fraction=1.0,
        reserve_gib=0.0,
        model=spec.name,
        window_pool=window_pool,
    )


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB // 100 else f"{n / 2**20:.3f} MiB"


def check_fits(plan: Plan, device: str) -> None:
    """Refuses a plan whose weights do not fit, or that leaves no token of KV cache, before anything loads."""
    if plan.fits and plan.max_total_num_tokens >= 1:
        return
    stage = plan.stages[plan.binding_stage if plan.binding_stage is not None else 0]
    knob = "--mem-fraction" if device == "cuda" else "--mem-budget"
    raise UserError(
        f"stage {stage.stage} needs {_gib(stage.weight_bytes)} for its weights (plus its KV cache) but its budget is "
        f"{_gib(stage.usable_bytes)}; raise {knob}, add stages (--pp) or use a smaller --dtype"
    )
