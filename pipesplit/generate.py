"""`pipesplit generate`: run a model as a pipeline on this machine (or under torchrun) and print."""

from __future__ import annotations

import argparse
import json
import os
import sys

from pipesplit.errors import UserError


def is_torchrun_worker() -> bool:
    """True in a process torchrun started for a stage other than rank 0."""
    return "PIPESPLIT_SPAWNED" not in os.environ and os.environ.get("RANK", "0") != "0" and "WORLD_SIZE" in os.environ


def parse_prompt_ids(values: list[str]) -> list[list[int]]:
    prompts = []
    for value in values:
        try:
            prompts.append([int(t) for t in value.split(",") if t.strip()])
        except ValueError:
            raise UserError(f"--prompt-ids {value!r} is not a comma-separated list of integers, e.g. 1,2,3") from None
    return prompts


# `LLM` keyword -> argparse destination, for the engine options `generate` and `serve` share
ENGINE_OPTIONS = {
    "pp": "pp", "strategy": "strategy", "partition": "partition", "dtype": "dtype", "device": "device",
    "mem_budget_gib": "mem_budget", "mem_fraction": "mem_fraction", "micro_batches": "micro_batches",
    "max_batch_tokens": "max_batch_tokens", "max_running_requests": "max_running_requests",
    "chunked_prefill_size": "chunked_prefill_size", "threads": "threads", "mtp": "mtp",
    "enable_prefix_caching": "prefix_cache",
}


def llm_kwargs(args: argparse.Namespace) -> dict:
    """The engine options shared by `generate` and `serve`."""
    return {keyword: getattr(args, dest) for keyword, dest in ENGINE_OPTIONS.items()}


def generate_command(args: argparse.Namespace) -> int:
    if is_torchrun_worker():
        from pipesplit.runtime.stage import worker_main

        return worker_main(args.device)
    from pipesplit.runtime.engine import LLM, EngineDeadError, check_prompt_ids, encode_prompt, exit_after_engine_death
    from pipesplit.runtime.loader import resolve_model
    from pipesplit.runtime.sampler import SamplingParams
    from pipesplit.runtime.tokenizer import load_tokenizer_or_none

    prompts: list = list(args.prompt) + parse_prompt_ids(args.prompt_ids)
    if not prompts:
        raise UserError("give a prompt (text) or --prompt-ids 1,2,3")
    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens, seed=args.seed
    )
    # Text prompts and --chat are checked before any stage process starts loading weights.
    source = resolve_model(args.model)
    tokenizer = load_tokenizer_or_none(source)
    encoded = [check_prompt_ids(source.spec, encode_prompt(tokenizer, source.spec.name, p, args.chat)) for p in prompts]
    try:
        with LLM(args.model, **llm_kwargs(args), progress=not args.json and sys.stderr.isatty()) as llm:
            outputs = llm.generate(encoded, params)
            report = _report(llm, prompts, outputs)
    except EngineDeadError as exc:
        print(f"pipesplit: error: {exc}", file=sys.stderr)
        exit_after_engine_death(1)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_human(report)
    return 0


def _report(llm, prompts, outputs) -> dict:
    stages = []
    for plan_stage, measured in zip(llm.plan.stages, llm.stage_reports):
        stages.append(
            {
                "stage": plan_stage.stage,
                "layers": list(plan_stage.layers),
                "embedding": plan_stage.embedding,
                "lm_head": plan_stage.lm_head,
                "mtp": plan_stage.mtp,
                "param_bytes": measured.param_bytes,
                "kv_tokens": measured.kv_tokens,
                "load_seconds": round(measured.load_seconds, 3),
            }
        )
    return {
        "model": llm.spec.name,
        "partition": list(llm.plan.partition),
        "max_total_num_tokens": llm.max_total_num_tokens,
        "window_slots": llm.engine.window_slots,
        "outputs": [
            {"prompt": p if isinstance(p, str) else list(p), "token_ids": list(o.token_ids), "text": o.text,
             "finish_reason": o.finish_reason, "cached_tokens": o.num_cached_tokens}
            for p, o in zip(prompts, outputs)
        ],
        "stages": stages,
    }


def _print_human(report: dict) -> None:
    for out in report["outputs"]:
        print(out["text"].strip() if out["text"].strip() else f"(token ids) {out['token_ids']}")
        print()
    binding = min(report["stages"], key=lambda s: s["kv_tokens"])["stage"]
    print(f"{report['model']}: partition {','.join(map(str, report['partition']))}, "
          f"max_total_num_tokens {report['max_total_num_tokens']} (binding stage {binding})")
    for s in report["stages"]:
        holds = [name for name in ("embedding", "lm_head", "mtp") if s[name]]
        start, end = s["layers"]
        print(
            f"  stage {s['stage']}: layers {start}-{end - 1} ({end - start})  {'+'.join(holds) or '-':<18}"
            f" {s['param_bytes'] / 2**20:8.1f} MiB  kv_tokens {s['kv_tokens']:>9}  loaded in {s['load_seconds']:.2f} s"
        )
