"""Output-token throughput on SmolLM2-135M-Instruct (float32, CPU), one run, JSON out.

(a) pipesplit PP1, (b) PP2 with two micro-batches in flight, (c) PP2 with one micro-batch in
flight, (d) Hugging Face transformers `generate`, batched, on the same requests. Every request
produces exactly its own output length (EOS ignored), and only those tokens count.

    .venv/bin/python bench/throughput.py            # the README numbers (several minutes)
    .venv/bin/python bench/throughput.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from pipesplit import LLM, SamplingParams  # noqa: E402
from pipesplit.runtime.loader import resolve_model, smollm2_path  # noqa: E402


def workload(n: int, seed: int, prompt_range: tuple[int, int], output_range: tuple[int, int]):
    rng = random.Random(seed)
    # ordinary vocabulary ids (the first ids of SmolLM2's vocabulary are special tokens)
    prompts = [[rng.randrange(100, 49000) for _ in range(rng.randint(*prompt_range))] for _ in range(n)]
    outputs = [rng.randint(*output_range) for _ in range(n)]
    return prompts, outputs


BUDGET_GIB = 1.5


def workload_balanced_partition(prompts, outputs, pp: int) -> tuple[int, ...]:
    """The split that evens out the compute this workload does per stage.

    Every prompt and output token passes through every layer; only output tokens pass through
    the lm_head (49152 x 576, about 8 of SmolLM2's layers), so the head is weighted by the share
    of output tokens. The planner's exact `balanced` search does the rest.
    """
    from pipesplit.planner.costs import cost_model
    from pipesplit.planner.partition import balanced
    from pipesplit.planner.plan import split_problem

    spec = resolve_model("smollm2").spec
    cost = cost_model(spec, kv_dtype="float32", weight_dtype="float32")
    share = sum(outputs) / (sum(outputs) + sum(map(len, prompts)))
    cost = dataclasses.replace(cost, head_flops_per_token=int(cost.head_flops_per_token * share))
    problem = split_problem(cost, [int(BUDGET_GIB * 2**30)] * pp)
    return balanced(spec.num_layers, pp, problem)


def run_pipesplit(prompts, outputs, pp: int, micro_batches: int, threads: int, partition=None) -> dict:
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in outputs]
    # (b) and (c) use the same split, so their ratio is what the micro-batches in flight are worth.
    with LLM("smollm2", pp=pp, partition=partition, micro_batches=micro_batches, threads=threads,
             mem_budget_gib=BUDGET_GIB, log=False) as llm:
        llm.generate([prompts[0][:8]], SamplingParams(temperature=0, max_tokens=2))  # warm-up
        started = time.perf_counter()
        results = llm.generate(prompts, params)
        elapsed = time.perf_counter() - started
        capacity, partition = llm.max_total_num_tokens, llm.plan.partition
    produced = sum(len(r.token_ids) for r in results)
    assert produced == sum(outputs), (produced, sum(outputs))
    return {"seconds": elapsed, "output_tokens": produced, "tokens_per_s": produced / elapsed,
            "max_total_num_tokens": capacity, "threads_per_stage": threads, "partition": list(partition)}


def run_transformers(prompts, outputs, batch_size: int, threads: int) -> dict:
    import transformers

    torch.set_num_threads(threads)
    path = smollm2_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding: the fairest batching
    started = time.perf_counter()
    with torch.inference_mode():
        for k in range(0, len(order), batch_size):
            idx = order[k : k + batch_size]
            longest = max(len(prompts[i]) for i in idx)
            ids = torch.zeros(len(idx), longest, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, i in enumerate(idx):  # left padding
                ids[row, longest - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[row, longest - len(prompts[i]) :] = 1
            n = max(outputs[i] for i in idx)
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    elapsed = time.perf_counter() - started
    produced = sum(outputs)
    return {"seconds": elapsed, "output_tokens": produced, "tokens_per_s": produced / elapsed,
            "batch_size": batch_size, "threads": threads}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hf-batch", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="8 short requests, to check the script runs")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "throughput.json"))
    args = parser.parse_args()
    if args.quick:
        prompts, outputs = workload(8, args.seed, (32, 64), (8, 16))
    else:
        prompts, outputs = workload(args.requests, args.seed, (32, 512), (64, 128))
    cores = os.cpu_count() or 1
    split = workload_balanced_partition(prompts, outputs, 2)
    runs = {}
    runs["a_pipesplit_pp1"] = run_pipesplit(prompts, outputs, 1, 1, cores)
    runs["b_pipesplit_pp2_microbatched"] = run_pipesplit(prompts, outputs, 2, 2, 1, split)
    runs["c_pipesplit_pp2_one_microbatch"] = run_pipesplit(prompts, outputs, 2, 1, 1, split)
    runs["d_transformers_generate"] = run_transformers(prompts, outputs, args.hf_batch, cores)
    ratios = {
        "a_over_d": runs["a_pipesplit_pp1"]["tokens_per_s"] / runs["d_transformers_generate"]["tokens_per_s"],
        "b_over_c": runs["b_pipesplit_pp2_microbatched"]["tokens_per_s"] / runs["c_pipesplit_pp2_one_microbatch"]["tokens_per_s"],
    }
    result = {
        "workload": {"requests": len(prompts), "seed": args.seed, "prompt_tokens": sum(map(len, prompts)),
                     "output_tokens": sum(outputs), "dtype": "float32", "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"},
        "machine": {"cpus": cores, "platform": platform.platform(), "torch": torch.__version__},
        "runs": runs,
        "ratios": ratios,
        "targets": {"a_over_d": 2.0, "b_over_c": 1.6},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| run | output tok/s | seconds |")
    print("|---|---|---|")
    for name, run in runs.items():
        print(f"| {name} | {run['tokens_per_s']:.1f} | {run['seconds']:.1f} |")
    print(f"\n(a)/(d) = {ratios['a_over_d']:.2f}x (target 2x); (b)/(c) = {ratios['b_over_c']:.2f}x (target 1.6x)")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
