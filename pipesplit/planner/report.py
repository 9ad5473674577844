"""`pipesplit plan`, `models` and `gpus`: build plans and print them for people (tables) or programs (JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from pipesplit.errors import UserError
from pipesplit.planner.engines import ENGINES, EngineModel, EngineSettings
from pipesplit.planner.hardware import DEFAULT_RESERVE_GIB, GPUS, GiB, check_memory_settings, resolve_devices
from pipesplit.planner.objectives import check_objective
from pipesplit.planner.partition import DEFAULT_STRATEGY, check_stage_count, check_strategy
from pipesplit.planner.plan import EXPLICIT, Plan, compare, make_plan, window_pool_for

BASELINE = "sglang-legacy"
DEFAULT_MEM_FRACTION = 0.9
ENV_VARS = {"sglang": "SGLANG_PP_LAYER_PARTITION", "vllm": "VLLM_PP_LAYER_PARTITION"}
BAR_WIDTH = 24


# ---------------------------------------------------------------------------------------------
# plan


def _engine_settings(args: argparse.Namespace) -> EngineSettings:
    """--engine (or the deprecated --target) and the engine flags, checked against each other."""
    engine = args.engine
    if args.target is not None:
        print("pipesplit: note: --target is deprecated and will be removed; use --engine", file=sys.stderr)
        if args.target not in ENGINES:
            raise UserError(f"unknown target {args.target!r}; give one of {', '.join(ENGINES)} (--target is now --engine)")
        if engine is not None and engine != args.target:
            raise UserError(f"--target {args.target} and --engine {engine} disagree; give --engine only")
        engine = args.target
    engine = engine or "pipesplit"
    if engine not in ENGINES:
        raise UserError(f"unknown engine {engine!r}; give one of {', '.join(ENGINES)}")
    own = {"vllm": "gpu_memory_utilization", "sglang": "mem_fraction_static"}
    for name, flag in (("vllm", "--gpu-memory-utilization"), ("sglang", "--mem-fraction-static")):
        if getattr(args, own[name]) is not None and engine != name:
            raise UserError(f"{flag} applies to --engine {name}, not {engine}; --engine pipesplit takes --mem-fraction")
    only = {"max_num_seqs": "vllm", "cuda_graph_max_bs": "sglang"}
    for key, name in only.items():
        if getattr(args, key) is not None and engine != name:
            raise UserError(f"--{key.replace('_', '-')} applies to --engine {name}, not {engine}")
    if engine != "pipesplit" and args.mem_fraction is not None:
        flag = "--gpu-memory-utilization" if engine == "vllm" else "--mem-fraction-static"
        raise UserError(f"--mem-fraction is pipesplit's own budget; give {engine}'s {flag} with --engine {engine}")
    if engine == "pipesplit":
        # With a simulation, --chunked-prefill-size is the simulated scheduler's chunk.
        keys = ("page_size", "max_model_len") if _simulates(args) else ("max_num_batched_tokens", "page_size", "max_model_len")
        for key in keys:
            if getattr(args, key) is not None:
                raise UserError(f"--{key.replace('_', '-')} is an engine flag; add --engine sglang or --engine vllm")
    fraction = args.gpu_memory_utilization if engine == "vllm" else args.mem_fraction_static
    batched = None if engine == "pipesplit" else args.max_num_batched_tokens
    return EngineSettings(engine, fraction, batched, args.max_num_seqs, args.max_model_len,
                          args.page_size, args.cuda_graph_max_bs, args.reserve if engine != "pipesplit" else None)


def _simulates(args: argparse.Namespace) -> bool:
    """--objective max-throughput/min-ttft, or --compare with a workload (--requests)."""
    from pipesplit.planner.objectives import SIMULATED

    return getattr(args, "objective", None) in SIMULATED or (args.compare and getattr(args, "requests", None) is not None)


def plan_command(args: argparse.Namespace) -> int:
    from pipesplit.planner.costs import cost_model, params_total, weight_bytes_total
    from pipesplit.planner.spec import hub_id_of, load_spec

    if args.tp < 1:
        raise UserError(f"--tp is {args.tp}; give 1 or more")
    reserve = DEFAULT_RESERVE_GIB if args.reserve is None else args.reserve
    settings = _engine_settings(args)
    mem_fraction = DEFAULT_MEM_FRACTION if args.mem_fraction is None else args.mem_fraction
    check_memory_settings(mem_fraction, reserve)
    if args.strategy:
        check_strategy(args.strategy)
    spec = load_spec(args.model, allow_download=not args.offline)
    cost = cost_model(spec, tp=args.tp, kv_dtype=args.kv_dtype, mtp=args.mtp)
    check_stage_count(spec.num_layers, args.pp)
    devices = resolve_devices(args.gpu, args.gpu_mem, args.pp)
    engine = EngineModel(spec, args.tp, settings)
    # --engine pipesplit: the runtime's own sliding-window pool at its default scheduler limits
    window_pool = window_pool_for(spec, micro_batches=args.pp) if settings.engine == "pipesplit" else None
    common = dict(reorder=args.reorder, mem_fraction=mem_fraction, reserve_gib=reserve, model=spec.name, engine=engine,
                  window_pool=window_pool)

    objective = args.objective or "max-kv"
    check_objective(objective)
    if args.objective and (args.strategy or args.partition):
        raise UserError(f"--objective {objective} chooses the split; drop --strategy/--partition")
    sim = None
    if _simulates(args):
        from pipesplit.planner.simreport import PlanSimulation

        sim = PlanSimulation.from_args(args, spec, cost, devices, common)
    if objective != "max-kv":
        selected = sim.best()
        plans = [*compare(cost, devices, **common), selected] if args.compare else [selected]
    elif args.compare:
        plans = list(compare(cost, devices, partition=args.partition, **common))
        wanted = EXPLICIT if args.partition else args.strategy or DEFAULT_STRATEGY
        selected = next(p for p in plans if p.strategy == wanted)
    else:
        selected = make_plan(cost, devices, args.strategy, args.partition, **common)
        if not selected.fits:
            raise UserError(_does_not_fit(selected, cost.kv_bytes_per_token_per_layer))
        plans = [selected]
    launch = None
    if settings.engine != "pipesplit":
        launch = launch_line(selected, hub_id_of(args.model), args.tp, settings, args.kv_dtype)
    warning = _max_model_len_warning(selected, spec, settings)

    if args.json:
        doc = {
            "model": spec.name,
            "architecture": spec.architecture,
            "num_layers": spec.num_layers,
            "params_total": params_total(spec),
            "weight_bytes_total": weight_bytes_total(spec),
            "kv_bytes_per_token_per_layer": cost.kv_bytes_per_token_per_layer,
            "layer_types": list(spec.layer_types),
            "sliding_window": spec.sliding_window,
            "tp": args.tp,
            "engine": settings.engine,
            "target": selected.target,
            "mem_fraction": selected.memory_fraction,
            "reserve_gib": reserve if settings.engine == "pipesplit" or args.reserve is not None else None,
            "selected": selected.strategy,
            "plans": [plan_to_dict(p) for p in plans],
        }
        if args.env:
            doc["env"] = {ENV_VARS[args.env]: _csv(selected.partition)}
        if launch:
            doc["launch"] = launch
        if warning:
            doc["warning"] = warning
        if sim is not None:
            doc["simulation"] = sim.to_json(plans)
        print(json.dumps(doc, indent=2))
        return 0
    if args.env:
        if not selected.fits:
            raise UserError(_does_not_fit(selected, cost.kv_bytes_per_token_per_layer))
        print(f"{ENV_VARS[args.env]}={_csv(selected.partition)}")
        return 0

    weight_gib = weight_bytes_total(spec) / GiB
    print(
        f"{spec.name} ({spec.architecture}): {spec.num_layers} layers, {params_total(spec) / 1e9:,.1f}B params, "
        f"{weight_gib:,.1f} GiB weights; KV {cost.kv_bytes_per_token_per_layer:,} B per token per layer per rank"
        + _attention_summary(spec)
    )
    if settings.engine == "pipesplit":
        memory = f"mem-fraction {mem_fraction:g}, reserve {reserve:g} GiB"
    else:
        flag = "gpu-memory-utilization" if settings.engine == "vllm" else "mem-fraction-static"
        default = "" if settings.memory_fraction is not None else " (engine default)"
        memory = f"{flag} {selected.memory_fraction:g}{default}" + (
            f", reserve {args.reserve:g} GiB" if args.reserve is not None else ", modelled overhead")
    print(f"PP {args.pp} x TP {args.tp}: {_device_summary(selected)}; {memory}; engine {settings.engine}")
    if args.compare:
        print()
        print(format_comparison(plans))
    if sim is not None:
        print()
        print(sim.format(plans if args.compare else [selected]))
    print()
    print(format_plan(selected, cost.kv_bytes_per_token_per_layer))
    if warning:
        print(f"warning: {warning}")
    if launch:
        print()
        print(launch)
    return 0


def _attention_summary(spec) -> str:
    sliding = spec.layer_types.count("sliding_attention")
    if not sliding:
        return ""
    sinks = ", attention sinks" if spec.attention_sinks else ""
    return f"; {sliding} of {spec.num_layers} layers sliding-window ({spec.sliding_window} tokens{sinks})"


def _max_model_len_warning(plan: Plan, spec, settings: EngineSettings) -> str | None:
    """vLLM refuses to start when the KV cache cannot hold one request of max_model_len tokens."""
    if settings.engine != "vllm" or not plan.fits:
        return None
    length = settings.max_model_len or spec.max_position_embeddings
    if plan.max_total_num_tokens >= length:
        return None
    return (f"vLLM will refuse to start: max_model_len {length:,} exceeds the {plan.max_total_num_tokens:,} KV tokens; "
            f"pass --max-model-len {plan.max_total_num_tokens:,} or less")


def launch_line(plan: Plan, model: str, tp: int, settings: EngineSettings, kv_dtype: str = "auto") -> str:
    """The command that starts the engine with this plan's partition and memory fraction."""
    parts = [f"{ENV_VARS[settings.engine]}={_csv(plan.partition)}"]
    if settings.engine == "sglang":
        parts += ["python -m sglang.launch_server", f"--model-path {model}", f"--tp-size {tp}",
                  f"--pp-size {len(plan.partition)}", f"--mem-fraction-static {plan.memory_fraction:g}"]
        flags = (("--chunked-prefill-size", settings.max_num_batched_tokens), ("--page-size", settings.page_size),
                 ("--context-length", settings.max_model_len), ("--cuda-graph-max-bs", settings.cuda_graph_max_bs))
    else:
        parts += ["vllm serve", model, f"--tensor-parallel-size {tp}", f"--pipeline-parallel-size {len(plan.partition)}",
                  f"--gpu-memory-utilization {plan.memory_fraction:g}"]
        flags = (("--max-num-batched-tokens", settings.max_num_batched_tokens), ("--block-size", settings.page_size),
                 ("--max-model-len", settings.max_model_len), ("--max-num-seqs", settings.max_num_seqs))
    parts += [f"{flag} {value}" for flag, value in flags if value is not None]
    if kv_dtype != "auto":
        parts.append(f"--kv-cache-dtype {kv_dtype}")
    return " ".join(parts)


def _csv(values: Sequence[int]) -> str:
    return ",".join(str(v) for v in values)


def _gib(n: int) -> str:
    return f"{n / GiB:,.1f}"


def _device_summary(plan: Plan) -> str:
    """Runs of identical devices in pipeline order: `4 x H100-80GB (79.6 GiB, 69.7 GiB usable) + 4 x H200 (...)`."""
    runs: list[list] = []
    for st in plan.stages:
        if runs and (runs[-1][1].gpu, runs[-1][1].usable_bytes) == (st.gpu, st.usable_bytes):
            runs[-1][0] += 1
        else:
            runs.append([1, st])
    return " + ".join(
        f"{count} x {st.gpu} ({_gib(st.capacity_bytes)} GiB, {_gib(st.usable_bytes)} GiB usable)" for count, st in runs
    )


def _does_not_fit(plan: Plan, kv: int) -> str:
    st = plan.stages[plan.binding_stage]
    per_token_layers = max(plan.partition) if plan.target == "sglang" else st.num_layers
    lacks = st.weight_bytes + per_token_layers * kv - st.usable_bytes
    what = "its weights" if st.weight_bytes > st.usable_bytes else "one KV token beside its weights"
    return (
        f"{plan.model} does not fit with partition {_csv(plan.partition)} ({plan.strategy}): stage "
        f"{st.stage} ({st.gpu}, layers {st.layers[0]}-{st.layers[1] - 1}) needs {_gib(st.weight_bytes)} GiB "
        f"of weights but has {_gib(st.usable_bytes)} GiB usable; it lacks {lacks / GiB:,.2f} GiB for {what}. "
        f"Add stages, use larger GPUs, raise --mem-fraction or raise --tp"
    )


def format_comparison(plans: Sequence[Plan]) -> str:
    """One row per strategy: partition, max_total_num_tokens and the gain over sglang-legacy."""
    base = next((p for p in plans if p.strategy == BASELINE), None)
    header = ("strategy", "partition", "max_total_num_tokens", f"vs {BASELINE}")
    rows = []
    for p in plans:
        tokens = f"{p.max_total_num_tokens:,}" if p.fits else f"does not fit (stage {p.binding_stage})"
        if not p.fits:
            gain = "-"
        elif base is None or not base.fits:
            gain = "legacy does not fit"
        else:
            gain = f"{p.max_total_num_tokens / base.max_total_num_tokens:.3f}x"
        rows.append((p.strategy, _csv(p.partition), tokens, gain))
    return _table(header, rows, right={2, 3})


def format_plan(plan: Plan, kv: int) -> str:
    """Per-stage rows (layers, extras, weights, KV tokens, unused memory, a bar) and the binding stage."""
    title = "explicit partition" if plan.strategy == EXPLICIT else f"strategy {plan.strategy}"
    lines = [f"{title}: partition {_csv(plan.partition)}"]
    header = ("stage", "gpu", "layers", "holds", "weights GiB", "overhead GiB", "KV tokens", "unused GiB",
              "memory (# weights, = KV, . unused)")
    rows = []
    for st in plan.stages:
        holds = "+".join(name for name, on in (("embed", st.embedding), ("head", st.lm_head), ("mtp", st.mtp)) if on)
        kv_used = st.kv_bytes or plan.max_total_num_tokens * st.num_layers * kv
        unused = st.usable_bytes - st.weight_bytes - kv_used
        rows.append(
            (
                str(st.stage),
                st.gpu,
                f"{st.layers[0]}-{st.layers[1] - 1}",
                holds or "-",
                _gib(st.weight_bytes),
                f"{st.overhead_bytes / GiB:,.2f}",
                f"{st.kv_tokens:,}",
                _gib(unused) if unused >= 0 else f"over by {_gib(-unused)}",
                _bar(st.usable_bytes, st.weight_bytes, kv_used),
            )
        )
    lines.append(_table(header, rows, right={0, 4, 5, 6, 7}))
    if plan.fits:
        lines.append(
            f"max_total_num_tokens {plan.max_total_num_tokens:,} (engine {plan.engine}); "
            f"binding stage {plan.binding_stage} ({plan.stages[plan.binding_stage].gpu})"
        )
    else:
        lines.append(f"does not fit (stage {plan.binding_stage})")
    return "\n".join(lines)


def _bar(usable: int, weights: int, kv_used: int) -> str:
    if usable <= 0 or weights > usable:
        return "[" + "#" * BAR_WIDTH + "]!"
    w = round(BAR_WIDTH * weights / usable)
    k = min(BAR_WIDTH - w, round(BAR_WIDTH * kv_used / usable))
    return "[" + "#" * w + "=" * k + "." * (BAR_WIDTH - w - k) + "]"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int] = frozenset()) -> str:
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    return "\n".join([line(header), *(line(r) for r in rows)])


def plan_to_dict(plan: Plan) -> dict:
    return {
        "strategy": plan.strategy,
        "engine": plan.engine,
        "target": plan.target,
        "partition": list(plan.partition),
        "max_total_num_tokens": plan.max_total_num_tokens,
        "fits": plan.fits,
        "binding_stage": plan.binding_stage,
        "stages": [
            {
                "stage": st.stage,
                "gpu": st.gpu,
                "capacity_bytes": st.capacity_bytes,
                "usable_bytes": st.usable_bytes,
                "layers": list(st.layers),
                "embedding": st.embedding,
                "lm_head": st.lm_head,
                "mtp": st.mtp,
                "weight_bytes": st.weight_bytes,
                "overhead_bytes": st.overhead_bytes,
                "kv_bytes_per_token": st.kv_bytes_per_token,
                "kv_bytes": st.kv_bytes,
                "kv_tokens": st.kv_tokens,
            }
            for st in plan.stages
        ],
    }


# ---------------------------------------------------------------------------------------------
# models, gpus


def models_command(args: argparse.Namespace) -> int:
    from pipesplit.planner.costs import params_total, weight_bytes_total
    from pipesplit.planner.spec import catalog_names, load_spec

    rows = []
    for name in catalog_names():
        spec = load_spec(name)
        rows.append(
            {
                "name": spec.name,
                "architecture": spec.architecture,
                "num_layers": spec.num_layers,
                "params_total": params_total(spec),
                "weight_bytes_total": weight_bytes_total(spec),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("model", "architecture", "layers", "params", "weights GiB")
    table = [
        (r["name"], r["architecture"], str(r["num_layers"]), f"{r['params_total'] / 1e9:,.2f}B", _gib(r["weight_bytes_total"]))
        for r in rows
    ]
    print(_table(header, table, right={2, 3, 4}))
    return 0


def gpus_command(args: argparse.Namespace) -> int:
    rows = [
        {
            "name": g.name,
            "memory_mib": g.memory_mib,
            "capacity_bytes": g.capacity_bytes,
            "bandwidth_gbs": g.bandwidth_gbs,
            "bf16_tflops": g.bf16_tflops,
            "aliases": list(g.aliases),
        }
        for g in GPUS
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    header = ("gpu", "memory MiB", "GiB", "bandwidth GB/s", "BF16 TFLOPS (dense)")
    table = [
        (r["name"], f"{r['memory_mib']:,}", _gib(r["capacity_bytes"]), f"{r['bandwidth_gbs']:,.0f}", f"{r['bf16_tflops']:,.1f}")
        for r in rows
    ]
    print(_table(header, table, right={1, 2, 3, 4}))
    print("Names are matched loosely: H100, h100-80gb, A100-40GB, 4090, RTX4090 all work.")
    return 0

