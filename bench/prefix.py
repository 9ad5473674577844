"""Prefix caching under load: pipesplit with the cache on and off (and vLLM CPU, when its venv exists).

Two workloads of token-id prompts (SmolLM2's vocabulary), greedy, EOS ignored, streamed through
/v1/completions by one async client against a server started here on 127.0.0.1:
- shared: 64 requests that share a 512-token system prompt, each with its own 32-128-token
  question and 64 output tokens, all submitted at once;
- multiturn: 16 conversations x 4 turns, all conversations at once; turn t's prompt is the system
  prompt, then turns 1..t-1 (each a question and a fixed 64-token answer), then question t, so
  each turn resends the previous one as its prefix.
Reports output tok/s, TTFT p50/p99 and the prefix-cache hit rate from each server's /metrics,
writes bench/results/prefix.json and prints a Markdown table with the ratios.

    .venv/bin/python bench/prefix.py [--pp 1] [--dtype auto] [--engines pipesplit-on,pipesplit-off,vllm]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve import RequestResult, machine_dtype, one_request, percentile, start_pipesplit, start_vllm, stop_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB = (1000, 40000)  # ordinary tokens of SmolLM2's 49,152: no specials, no byte fallbacks
SYSTEM_TOKENS = 512
OUTPUT_TOKENS = 64


# -- workloads ---------------------------------------------------------------------------------------------
def shared_prompt_workload(seed: int, requests: int = 64) -> list[list[list[int]]]:
    """One wave of `requests` prompts (a single conversation turn each)."""
    rng = random.Random(seed)
    system = [rng.randrange(*VOCAB) for _ in range(SYSTEM_TOKENS)]
    return [[system + [rng.randrange(*VOCAB) for _ in range(rng.randint(32, 128))]] for _ in range(requests)]


def multiturn_workload(seed: int, conversations: int = 16, turns: int = 4) -> list[list[list[int]]]:
    """Per conversation, its prompts turn by turn (each extends the previous one)."""
    rng = random.Random(seed + 1)
    system = [rng.randrange(*VOCAB) for _ in range(SYSTEM_TOKENS)]
    out = []
    for _ in range(conversations):
        history, prompts = list(system), []
        for _ in range(turns):
            history += [rng.randrange(*VOCAB) for _ in range(rng.randint(32, 128))]
            prompts.append(list(history))
            history += [rng.randrange(*VOCAB) for _ in range(OUTPUT_TOKENS)]  # the answer the client resends
        out.append(prompts)
    return out


WORKLOADS = {"shared": shared_prompt_workload, "multiturn": multiturn_workload}


# -- the client ----------------------------------------------------------------------------------------------
async def run_workload(url: str, model: str, conversations: list[list[list[int]]]) -> dict:
    """Every conversation at once; each conversation's turns one after the other."""
    limits = httpx.Limits(max_connections=len(conversations), max_keepalive_connections=len(conversations))
    results: list[RequestResult] = []
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=limits) as client:

        async def converse(turns: list[list[int]]) -> None:
            for prompt in turns:
                results.append(await one_request(client, model, prompt, OUTPUT_TOKENS))

        started = time.perf_counter()
        await asyncio.gather(*(converse(c) for c in conversations))
        wall = time.perf_counter() - started
    ttft = [r.ttft_s for r in results]
    tokens = sum(r.output_tokens for r in results)
    return {
        "requests": len(results),
        "prompt_tokens": sum(len(p) for c in conversations for p in c),
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "throughput_tok_s": round(tokens / wall, 2),
        "ttft_p50_ms": round(percentile(ttft, 50) * 1e3, 1),
        "ttft_p99_ms": round(percentile(ttft, 99) * 1e3, 1),
    }


def cache_counters(url: str, queries: str, hits: str) -> tuple[float, float]:
    """(tokens looked up, tokens hit) from a Prometheus /metrics page."""
    text = httpx.get(f"{url}/metrics", timeout=30).text

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, flags=re.M))

    return total(queries), total(hits)


# -- the engines ----------------------------------------------------------------------------------------------
PIPESPLIT_COUNTERS = ("pipesplit_prefix_cache_queries_total", "pipesplit_prefix_cache_hits_total")
VLLM_COUNTERS = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total")

# name -> (start the server, its /metrics counters of looked-up and hit prompt tokens)
ENGINES = {
    "pipesplit-on": (lambda args: start_pipesplit(args, args.pp), PIPESPLIT_COUNTERS),
    "pipesplit-off": (lambda args: start_pipesplit(args, args.pp, "--disable-prefix-cache"), PIPESPLIT_COUNTERS),
    "vllm": (lambda args: start_vllm(args, args.pp, "--enable-prefix-caching"), VLLM_COUNTERS),
}


def measure(name: str, args: argparse.Namespace) -> dict:
    start, counters = ENGINES[name]
    proc, url = start(args)
    out = {}
    try:
        asyncio.run(run_workload(url, args.model, [[[1000 + i for i in range(16)]]]))  # warm-up
        for workload in args.workloads:
            before = cache_counters(url, *counters)
            result = asyncio.run(run_workload(url, args.model, WORKLOADS[workload](args.seed)))
            after = cache_counters(url, *counters)
            queried, hit = after[0] - before[0], after[1] - before[1]
            result["cache_hit_rate"] = round(hit / queried, 4) if queried else 0.0
            out[workload] = result
            print(f"bench: {name} {workload}: {result['throughput_tok_s']} tok/s, TTFT p50 {result['ttft_p50_ms']} ms, "
                  f"hit rate {result['cache_hit_rate']:.1%}", file=sys.stderr, flush=True)
    finally:
        out["server_exit_code"] = stop_server(proc)
    return out


def markdown(results: dict, workloads: list[str]) -> str:
    rows = ["| workload | engine | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | hit rate | vs pipesplit-off |",
            "|---|---|---:|---:|---:|---:|---:|"]
    for workload in workloads:
        base = results.get("pipesplit-off", {}).get(workload, {}).get("throughput_tok_s")
        for engine, by_workload in results.items():
            r = by_workload[workload]
            ratio = f"{r['throughput_tok_s'] / base:.2f}x" if base else "-"
            rows.append(f"| {workload} | {engine} | {r['throughput_tok_s']:.1f} | {r['ttft_p50_ms']:.0f} | "
                        f"{r['ttft_p99_ms']:.0f} | {r['cache_hit_rate']:.1%} | {ratio} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="auto: what `pipesplit serve` picks on this CPU, given to both engines")
    parser.add_argument("--mem-budget", type=float, default=2.0, help="GiB per stage (CPU)")
    parser.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated: {', '.join(ENGINES)}")
    parser.add_argument("--workloads", default="shared,multiturn")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-timeout", type=float, default=900.0, help="seconds (vLLM compiles at start-up)")
    parser.add_argument("--peers", type=Path, default=Path(os.environ.get("PEERS") or ROOT / "bench" / ".peers"),
                        help="where bench/peers.py keeps vLLM's venv")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prefix.json")
    args = parser.parse_args()
    args.dtype = machine_dtype(args.dtype)
    args.workloads = args.workloads.split(",")
    unknown = [e for e in args.engines.split(",") if e not in ENGINES]
    if unknown:
        raise SystemExit(f"bench: unknown engine {unknown[0]!r}; choose from {', '.join(ENGINES)}")

    results = {name: measure(name, args) for name in args.engines.split(",")}
    ratios = {}
    for workload in args.workloads:
        tput = {e: r[workload]["throughput_tok_s"] for e, r in results.items()}
        if "pipesplit-on" in tput and "pipesplit-off" in tput:
            ratios[f"{workload}: on / off"] = round(tput["pipesplit-on"] / tput["pipesplit-off"], 3)
        if "pipesplit-on" in tput and "vllm" in tput:
            ratios[f"{workload}: pipesplit-on / vllm"] = round(tput["pipesplit-on"] / tput["vllm"], 3)
    report = {
        "bench": "prefix",
        "model": args.model,
        "pp": args.pp,
        "dtype": args.dtype,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "metrics": "TTFT: request sent -> first text chunk; throughput: output tokens / wall time of the workload; "
                   "hit rate: prefix-cache hit tokens / looked-up prompt tokens from the server's /metrics",
        "results": results,
        "ratios": ratios,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"{args.model}, pp {args.pp}, dtype {args.dtype}, CPU ({os.cpu_count()} cores)\n")
    print(markdown(results, args.workloads))
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
