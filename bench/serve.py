"""HTTP load against `pipesplit serve`: TTFT, time per output token and throughput per concurrency.

Starts its own server (smollm2, pp 2 by default) on a free port of 127.0.0.1, sends a bounded
number of streaming /v1/completions requests at each concurrency level (fixed output length:
ignore_eos), writes bench/results/serve.json and prints a Markdown table.

    .venv/bin/python bench/serve.py [--concurrency 1,4,16] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "The history of the printing press begins",
    "Write a short poem about the sea.",
    "def quicksort(items):",
    "The three primary colours are",
    "In a small village at the foot of the mountains,",
    "Photosynthesis is the process by which",
    "List five fruits:",
    "The quick brown fox",
]


@dataclass
class RequestResult:
    ttft_s: float
    latency_s: float
    output_tokens: int

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first."""
        if self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# -- the server ------------------------------------------------------------------------------------------
def start_server(cmd: list[str], env: dict[str, str], start_timeout: float) -> tuple[subprocess.Popen, str]:
    """Starts `pipesplit serve ... --port 0` and returns it with the URL its ready line names."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    found: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            match = re.search(r"serving \S+ on (http://\S+)", line)
            if match and not found:
                found.append(match.group(1))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + start_timeout
    while not found:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"bench: the server did not start (exit code {proc.poll()})")
        time.sleep(0.1)
    return proc, found[0]


def pipesplit_command(args: argparse.Namespace) -> list[str]:
    return [sys.executable, "-m", "pipesplit", "serve", args.model, "--pp", str(args.pp), "--host", "127.0.0.1",
            "--port", "0", "--mem-budget", str(args.mem_budget)]


def stop_server(proc: subprocess.Popen) -> int:
    proc.terminate()
    try:
        return proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


# -- the load ----------------------------------------------------------------------------------------------
async def one_request(client: httpx.AsyncClient, model: str, prompt: str | list[int], max_tokens: int) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = None
    output_tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if first is None and event["choices"] and event["choices"][0]["text"]:
                first = time.perf_counter()
            if event.get("usage"):
                output_tokens = event["usage"]["completion_tokens"]
    end = time.perf_counter()
    return RequestResult(ttft_s=(first or end) - started, latency_s=end - started, output_tokens=output_tokens)


async def run_level(url: str, model: str, concurrency: int, num_requests: int, max_tokens: int) -> dict:
    """`num_requests` requests, at most `concurrency` in flight at once."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        todo = iter(range(num_requests))
        results: list[RequestResult] = []

        async def worker() -> None:
            for i in todo:
                results.append(await one_request(client, model, PROMPTS[i % len(PROMPTS)], max_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ttft = [r.ttft_s for r in results]
    tpot = [r.tpot_s for r in results if r.tpot_s is not None]
    tokens = sum(r.output_tokens for r in results)
    return {
        "concurrency": concurrency,
        "requests": num_requests,
        "max_tokens": max_tokens,
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "throughput_tok_s": round(tokens / wall, 2),
        "requests_per_s": round(num_requests / wall, 3),
        "ttft_p50_ms": round(percentile(ttft, 50) * 1e3, 1),
        "ttft_p99_ms": round(percentile(ttft, 99) * 1e3, 1),
        "tpot_p50_ms": round(percentile(tpot, 50) * 1e3, 1),
        "tpot_p99_ms": round(percentile(tpot, 99) * 1e3, 1),
        "latency_p50_s": round(percentile([r.latency_s for r in results], 50), 3),
        "latency_p99_s": round(percentile([r.latency_s for r in results], 99), 3),
        "per_request": [asdict(r) for r in results],
    }


def markdown(levels: list[dict]) -> str:
    rows = [
        "| concurrency | requests | output tok/s | req/s | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in levels:
        rows.append(
            f"| {lv['concurrency']} | {lv['requests']} | {lv['throughput_tok_s']:.1f} | {lv['requests_per_s']:.2f} | "
            f"{lv['ttft_p50_ms']:.0f} | {lv['ttft_p99_ms']:.0f} | {lv['tpot_p50_ms']:.0f} | {lv['tpot_p99_ms']:.0f} |"
        )
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--mem-budget", type=float, default=1.0, help="GiB per stage (CPU)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated levels")
    parser.add_argument("--requests", type=int, default=None, help="requests per level (default: max(8, 2 x level))")
    parser.add_argument("--max-tokens", type=int, default=32, help="output tokens per request (ignore_eos)")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve.json")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    proc, url = start_server(pipesplit_command(args), {}, args.start_timeout)
    try:
        asyncio.run(run_level(url, args.model, 1, 1, 4))  # warm-up: first-call costs stay out of the numbers
        results = []
        for c in levels:
            n = args.requests or max(8, 2 * c)
            results.append(asyncio.run(run_level(url, args.model, c, n, args.max_tokens)))
            print(f"bench: concurrency {c}: {results[-1]['throughput_tok_s']} tok/s", file=sys.stderr, flush=True)
    finally:
        exit_code = stop_server(proc)

    report = {
        "bench": "serve",
        "model": args.model,
        "pp": args.pp,
        "mem_budget_gib": args.mem_budget,
        "device": "cpu",
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "server_exit_code": exit_code,
        "metrics": "TTFT: request sent -> first text chunk; TPOT: (latency - TTFT) / (output tokens - 1); "
                   "throughput: output tokens of the level / wall time of the level",
        "levels": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"{args.model}, pp {args.pp}, CPU ({os.cpu_count()} cores), {args.max_tokens} output tokens per request\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
