"""The seed's question: DeepSeek-V3 at PP8 on H200 (TP1, TP2), what the split does to TTFT and throughput.

Roofline step costs (`planner.simulator.RooflineCosts`, NVLink), pure Python. Two workloads:
- one 128K-token prompt, chunked prefill 4096: TTFT under pipesplit's scheduler (a request's next
  chunk waits for its previous one) and with pipelined chunks (SGLang's PP scheduler, a flow shop:
  `chunk_pipeline_ttft`);
- decode-heavy serving: many requests with short prompts and long outputs, all at once.
Splits: remainder-first (SGLang #13282), remainder-last (#13977), vllm, max-kv, and the simulated
max-throughput (local search, see `planner.objectives`).

    .venv/bin/python bench/seed_question.py   # writes bench/results/seed_question.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from pipesplit.planner.costs import cost_model
from pipesplit.planner.hardware import resolve_devices
from pipesplit.planner.objectives import search
from pipesplit.planner.plan import make_plan
from pipesplit.planner.simulator import (
    PipelineConfig,
    Workload,
    chunk_pipeline_ttft,
    roofline_costs,
    simulate,
)
from pipesplit.planner.spec import load_spec

STRATEGIES = ("remainder-first", "remainder-last", "vllm", "max-kv")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--out", default="bench/results/seed_question.json")
    args = ap.parse_args()
    spec = load_spec("deepseek-v3")
    devices = resolve_devices("H200", None, 8)
    long_prompt = Workload(1, (131072, 131072), (1, 1))
    long_config = PipelineConfig(max_batch_tokens=4096, chunked_prefill_size=4096, prefix_caching=False)
    serving = Workload(args.requests, (256, 1024), (256, 512), seed=0)
    serving_config = PipelineConfig(max_batch_tokens=4096, chunked_prefill_size=4096, prefix_caching=False)
    rows = []
    for tp in (1, 2):
        cost = cost_model(spec, tp=tp)
        costs = roofline_costs(spec, "H200", 8, tp=tp)
        no_schedule = dataclasses.replace(costs, efficiency=dataclasses.replace(costs.efficiency, step_overhead_s=0.0))
        plans = {name: make_plan(cost, devices, name) for name in STRATEGIES}

        def evaluate(partition):
            plan = make_plan(cost, devices, None, partition)
            if not plan.fits:
                return None
            return plan, simulate(spec, partition, plan.max_total_num_tokens, costs, serving, serving_config)

        started = time.perf_counter()
        found = search("max-throughput", spec.num_layers, 8, evaluate, starts=[p.partition for p in plans.values()])
        plans["max-throughput"] = dataclasses.replace(found.plan, strategy="max-throughput")
        search_s = time.perf_counter() - started
        for name, plan in plans.items():
            long = simulate(spec, plan.partition, plan.max_total_num_tokens, costs, long_prompt, long_config)
            served = simulate(spec, plan.partition, plan.max_total_num_tokens, costs, serving, serving_config)
            row = {
                "tp": tp, "strategy": name, "partition": list(plan.partition),
                "max_total_num_tokens": plan.max_total_num_tokens,
                "ttft_128k_s": long.ttft_p50,
                "ttft_128k_pipelined_chunks_s": chunk_pipeline_ttft(spec, plan.partition, costs, 131072, 4096),
                # the same flow shop with every chunk priced like the first: no attention growth
                "ttft_128k_pipelined_flat_chunks_s": chunk_pipeline_ttft(spec, plan.partition, costs, 131072, 4096,
                                                                         context_grows=False),
                # and without rank 0's per-step scheduling work
                "ttft_128k_pipelined_no_schedule_s": chunk_pipeline_ttft(spec, plan.partition, no_schedule, 131072, 4096),
                "serving_output_tok_s": served.output_tokens_per_s,
                "serving_tpot_p50_ms": served.tpot_p50 * 1e3,
                "serving_stage_busy": [round(b, 3) for b in served.stage_busy],
            }
            if name == "max-throughput":
                row["search"] = {"method": found.method, "evaluated": found.evaluated, "seconds": round(search_s, 1)}
            rows.append(row)
            print(f"TP{tp} {name:<15} {','.join(map(str, plan.partition)):<18} KV {plan.max_total_num_tokens:>9,}  "
                  f"TTFT 128K {row['ttft_128k_s']:6.2f} s (pipelined chunks {row['ttft_128k_pipelined_chunks_s']:6.2f} s, "
                  f"flat {row['ttft_128k_pipelined_flat_chunks_s']:6.2f}, no sched {row['ttft_128k_pipelined_no_schedule_s']:6.2f})"
                  f"  serving {row['serving_output_tok_s']:8.1f} tok/s, TPOT {row['serving_tpot_p50_ms']:6.1f} ms",
                  flush=True)
    Path(args.out).write_text(json.dumps({"workloads": {"long": vars(long_prompt), "serving": vars(serving)},
                                          "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
