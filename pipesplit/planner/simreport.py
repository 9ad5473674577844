"""`pipesplit simulate` and the simulated parts of `pipesplit plan` (`--objective`, `--compare` with a
workload): flags, the step costs they name, and the tables and JSON they print."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence

from pipesplit.errors import UserError
from pipesplit.planner.hardware import find_gpu_or_none
from pipesplit.planner.plan import Plan
from pipesplit.planner.simulator import (
    LINKS,
    PipelineConfig,
    ProfileCosts,
    SimResult,
    StepCosts,
    Workload,
    load_profile,
    parse_range,
    roofline_costs,
    simulate,
)
from pipesplit.planner.spec import ModelSpec


def add_workload_args(p: argparse.ArgumentParser, chunk_flag: bool = True) -> None:
    p.add_argument("--profile", help="step costs measured by `pipesplit profile` (default: the GPUs' roofline)")
    p.add_argument("--link", default="nvlink", help=f"roofline: stage-to-stage link, one of {', '.join(LINKS)}")
    p.add_argument("--requests", type=int, default=None, help="simulated workload: number of requests")
    p.add_argument("--prompt-len", default="512", help="prompt tokens, N or A-B (uniform)")
    p.add_argument("--output-len", default="128", help="output tokens, N or A-B (uniform)")
    p.add_argument("--rate", type=float, default=None, help="Poisson arrivals per second (default: all at once)")
    p.add_argument("--micro-batches", type=int, default=None, help="micro-batches in flight (default: pp)")
    p.add_argument("--max-batch-tokens", type=int, default=2048, help="token budget of one micro-batch")
    p.add_argument("--max-running-requests", type=int, default=256, help="requests decoding at once")
    if chunk_flag:
        p.add_argument("--chunked-prefill-size", type=int, default=512, help="longest prefill chunk per step")
    p.add_argument("--disable-prefix-cache", dest="prefix_cache", action="store_false")
    p.add_argument("--seed", type=int, default=0, help="workload seed (same seed, same simulation)")


def workload_of(args: argparse.Namespace) -> Workload:
    requests = 64 if args.requests is None else args.requests
    return Workload(requests, parse_range(args.prompt_len, "--prompt-len"), parse_range(args.output_len, "--output-len"),
                    args.rate, args.seed)


def pipeline_config_of(args: argparse.Namespace, chunk: int | None) -> PipelineConfig:
    return PipelineConfig(args.micro_batches, args.max_batch_tokens, args.max_running_requests, chunk or 512,
                          args.prefix_cache)


def step_costs_of(args: argparse.Namespace, spec: ModelSpec, gpus: Sequence[str], tp: int, kv_dtype: str) -> StepCosts:
    """--profile FILE, or the roofline of the (catalog) GPUs."""
    if args.profile:
        return ProfileCosts(load_profile(args.profile), spec)
    unknown = [g for g in gpus if find_gpu_or_none(g) is None]
    if unknown:
        raise UserError(f"{unknown[0]} is not a catalog GPU, so it has no roofline; give --gpu NAME or --profile FILE")
    return roofline_costs(spec, ",".join(gpus), len(gpus), tp, args.link, kv_dtype)


def simulate_plan(spec: ModelSpec, plan: Plan, costs: StepCosts, workload: Workload, config: PipelineConfig) -> SimResult:
    if not plan.fits:
        raise UserError(f"partition {_csv(plan.partition)} does not fit (stage {plan.binding_stage}); "
                        "pick another split or more memory")
    return simulate(spec, plan.partition, plan.max_total_num_tokens, costs, workload, config)


def try_simulate(spec, plan, costs, workload, config) -> SimResult | None:
    """The simulation, or None for a split that does not fit or cannot hold the workload."""
    try:
        return simulate_plan(spec, plan, costs, workload, config)
    except UserError:
        return None


# -- output ----------------------------------------------------------------------------------------------
def _csv(values: Sequence[int]) -> str:
    return ",".join(map(str, values))


def _ms(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1e3:,.1f}"


def format_result(result: SimResult) -> str:
    lines = [
        f"output {result.output_tokens_per_s:,.1f} tok/s, makespan {result.makespan:,.3f} s, "
        f"{result.steps} steps, {result.preemptions} preemptions",
        f"TTFT p50 {_ms(result.ttft_p50)} ms, p99 {_ms(result.ttft_p99)} ms; "
        f"TPOT p50 {_ms(result.tpot_p50)} ms, p99 {_ms(result.tpot_p99)} ms",
        "stage busy: " + "  ".join(f"{s}: {b:.0%}" for s, b in enumerate(result.stage_busy)),
    ]
    return "\n".join(lines)


def comparison_rows(plans: Sequence[Plan], simulated: Callable[[Plan], SimResult | None]) -> list[tuple[str, ...]]:
    rows = []
    for plan in plans:
        r = simulated(plan) if plan.fits else None
        if r is None:
            rows.append((plan.strategy, _csv(plan.partition), "-", "-", "-"))
        else:
            rows.append((plan.strategy, _csv(plan.partition), f"{r.output_tokens_per_s:,.1f}", _ms(r.ttft_p50),
                         _ms(r.tpot_p50)))
    return rows


def format_rows(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda cells: "  ".join(str(c).rjust(w) if i >= 2 else str(c).ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(r) for r in rows)])


SIM_HEADER = ("strategy", "partition", "output tok/s", "TTFT p50 ms", "TPOT p50 ms")


def describe(costs: StepCosts) -> str:
    if isinstance(costs, ProfileCosts):
        p = costs.profile
        return f"profile of {p.model} ({p.device}, {p.dtype}, {p.threads} thread(s))"
    names = sorted({g.name for g in costs.gpus})
    return f"roofline of {','.join(names)} TP{costs.tp}, link {costs.link.name}"


def describe_workload(w: Workload, c: PipelineConfig, num_stages: int) -> str:
    arrivals = "all at once" if w.rate is None else f"Poisson {w.rate:g}/s"
    return (f"{w.requests} requests, prompt {w.prompt_len[0]}-{w.prompt_len[1]}, output {w.output_len[0]}-"
            f"{w.output_len[1]} tokens, {arrivals}, seed {w.seed}; micro-batches {c.micro_batches or num_stages}, "
            f"chunked prefill {c.chunked_prefill_size}, batch tokens {c.max_batch_tokens}")


# -- pipesplit simulate ------------------------------------------------------------------------------------------
def simulate_command(args: argparse.Namespace) -> int:
    from pipesplit.planner.costs import cost_model
    from pipesplit.planner.hardware import resolve_devices
    from pipesplit.planner.partition import check_stage_count, check_strategy
    from pipesplit.planner.plan import make_plan
    from pipesplit.planner.spec import load_spec

    if args.strategy:
        check_strategy(args.strategy)
    spec = load_spec(args.model, allow_download=False)
    check_stage_count(spec.num_layers, args.pp)
    if args.profile and args.gpu:
        raise UserError("give --profile (measured costs) or --gpu (roofline), not both")
    if args.profile:
        from pipesplit.runtime.plan_bridge import budgets_for, packs_tied_head, runtime_plan

        profile = load_profile(args.profile)
        budgets = budgets_for(spec, args.pp, "cpu", args.mem_budget, 0.9)
        plan = runtime_plan(spec, args.pp, args.strategy, args.partition, profile.dtype, budgets,
                            packed_tied_head=packs_tied_head(spec, profile.device, profile.dtype))
        costs: StepCosts = ProfileCosts(profile, spec)
    else:
        if not args.gpu:
            raise UserError("give --profile FILE (measured on this machine) or --gpu NAME (roofline)")
        devices = resolve_devices(args.gpu, None, args.pp)
        cost = cost_model(spec, tp=args.tp, kv_dtype=args.kv_dtype)
        plan = make_plan(cost, devices, args.strategy, args.partition, mem_fraction=args.mem_fraction,
                         reserve_gib=args.reserve, model=spec.name)
        costs = step_costs_of(args, spec, [d.name for d in devices], args.tp, args.kv_dtype)
    workload = workload_of(args)
    config = pipeline_config_of(args, args.chunked_prefill_size)
    result = simulate_plan(spec, plan, costs, workload, config)
    if args.json:
        doc = {"model": spec.name, "pp": args.pp, "strategy": plan.strategy, "costs": describe(costs),
               "workload": describe_workload(workload, config, args.pp), **result.to_json()}
        print(json.dumps(doc, indent=2))
        return 0
    print(f"{spec.name} PP{args.pp}, partition {_csv(plan.partition)} ({plan.strategy}), "
          f"max_total_num_tokens {plan.max_total_num_tokens:,}; {describe(costs)}")
    print(f"workload: {describe_workload(workload, config, args.pp)}")
    print(format_result(result))
    return 0


# -- pipesplit plan --objective / --compare with a workload ------------------------------------------------------
class PlanSimulation:
    """The plan command's simulations: one per partition asked about, cached."""

    def __init__(self, args: argparse.Namespace, spec: ModelSpec, cost, devices, common: dict, costs: StepCosts) -> None:
        self.objective = args.objective or "max-kv"
        self.spec, self.cost, self.devices, self.common, self.costs = spec, cost, devices, common, costs
        self.workload = workload_of(args)
        self.config = pipeline_config_of(args, args.max_num_batched_tokens)
        self.search_result = None
        self._results: dict[tuple[int, ...], SimResult | None] = {}

    @classmethod
    def from_args(cls, args, spec, cost, devices, common) -> "PlanSimulation":
        return cls(args, spec, cost, devices, common, step_costs_of(args, spec, [d.name for d in devices], args.tp,
                                                                   args.kv_dtype))

    def result(self, plan: Plan) -> SimResult | None:
        if plan.partition not in self._results:
            self._results[plan.partition] = try_simulate(self.spec, plan, self.costs, self.workload, self.config) \
                if plan.fits else None
        return self._results[plan.partition]

    def _evaluate(self, partition: tuple[int, ...]):
        from pipesplit.planner.plan import make_plan

        plan = make_plan(self.cost, self.devices, None, partition, **self.common)
        r = self.result(plan)
        return None if r is None else (plan, r)

    def best(self) -> Plan:
        """The split the objective picks (Plan.strategy is the objective's name)."""
        import dataclasses

        from pipesplit.planner.objectives import search
        from pipesplit.planner.plan import compare

        starts = [p.partition for p in compare(self.cost, self.devices, **self.common) if p.fits]
        self.search_result = search(self.objective, self.spec.num_layers, len(self.devices), self._evaluate, starts)
        return dataclasses.replace(self.search_result.plan, strategy=self.objective)

    def _search_line(self) -> str:
        s = self.search_result
        if s is None:
            return ""
        how = "every contiguous split" if s.method == "exhaustive" else \
            "local search from the strategies' splits (a local optimum under one-layer moves)"
        return f"\nobjective {self.objective}: {how}, {s.evaluated} splits simulated"

    def format(self, plans: Sequence[Plan]) -> str:
        head = f"simulated ({describe(self.costs)}): {describe_workload(self.workload, self.config, len(self.devices))}"
        return head + self._search_line() + "\n" + format_rows(SIM_HEADER, comparison_rows(plans, self.result))

    def to_json(self, plans: Sequence[Plan]) -> dict:
        s = self.search_result
        return {
            "objective": self.objective,
            "costs": describe(self.costs),
            "workload": describe_workload(self.workload, self.config, len(self.devices)),
            "search": None if s is None else {"method": s.method, "evaluated": s.evaluated},
            "results": [{"strategy": p.strategy, **(r.to_json() if (r := self.result(p)) else {"partition": list(p.partition), "fits": False})}
                        for p in plans],
        }
