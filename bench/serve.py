"""HTTP load against `pipesplit serve` and vLLM's OpenAI server: TTFT, time per output token, throughput.

Starts each server in turn (pipesplit PP1 and PP2, vLLM CPU PP1 from its own venv, see
bench/peers.py) on a free port of 127.0.0.1, sends the same streaming /v1/completions requests at
each concurrency level (fixed output length: ignore_eos; default: concurrency 16, 48 requests of
64 tokens, the dtype `auto` picks) `--rounds` times (default 3; the median round counts), writes
bench/results/serve.json and prints a Markdown table.

    .venv/bin/python bench/serve.py [--engines pipesplit-pp1,vllm-pp1] [--concurrency 1,4,16]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

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


# -- the servers ----------------------------------------------------------------------------------------
def start_pipesplit(args: argparse.Namespace, pp: int, *extra: str) -> tuple[subprocess.Popen, str]:
    """`pipesplit serve ... --port 0` (extra: more flags); ready when its ready line names the URL."""
    cmd = [sys.executable, "-m", "pipesplit", "serve", args.model, "--pp", str(pp), "--host", "127.0.0.1",
           "--port", "0", "--mem-budget", str(args.mem_budget), "--dtype", args.dtype, *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    found: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            match = re.search(r"serving \S+ on (http://\S+)", line)
            if match and not found:
                found.append(match.group(1))

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + args.start_timeout
    while not found:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the pipesplit server did not start (exit code {proc.poll()})")
        time.sleep(0.1)
    return proc, found[0]


def start_vllm(args: argparse.Namespace, pp: int, *extra: str) -> tuple[subprocess.Popen, str]:
    """vLLM's OpenAI server from its own venv (bench/peers.py; extra: more flags); ready when
    /v1/models answers."""
    from peers import vllm_server_command

    port = free_port()
    cmd, env = vllm_server_command(args.peers.resolve(), args.dtype, pp, port, extra)
    log = open(args.out.with_suffix(f".vllm-pp{pp}.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"vLLM's server did not start (exit code {proc.poll()}); see {log.name}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1.0)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def markdown(runs: list[dict]) -> str:
    rows = [
        "| engine | concurrency | requests | output tok/s | req/s | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | TPOT p99 (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        if "error" in run:
            rows.append(f"| {run['engine']} | failed: {run['error'].splitlines()[0]} |")
    for lv, engine in ((lv, run["engine"]) for run in runs for lv in run["levels"]):
        rows.append(
            f"| {engine} | {lv['concurrency']} | {lv['requests']} | {lv['throughput_tok_s']:.1f} | {lv['requests_per_s']:.2f} | "
            f"{lv['ttft_p50_ms']:.0f} | {lv['ttft_p99_ms']:.0f} | {lv['tpot_p50_ms']:.0f} | {lv['tpot_p99_ms']:.0f} |"
        )
    return "\n".join(rows)


def run_engine(engine: str, args: argparse.Namespace, levels: list[int]) -> dict:
    """One server: start, warm up, every concurrency level, stop."""
    name, _, pp = engine.rpartition("-pp")
    started = time.perf_counter()
    proc, url = (start_pipesplit if name == "pipesplit" else start_vllm)(args, int(pp))
    startup = time.perf_counter() - started
    try:
        asyncio.run(run_level(url, args.model, 1, 1, 4))  # warm-up: first-call costs stay out of the numbers
        results = []
        for c in levels:
            n = args.requests or max(8, 2 * c)
            # the same load `rounds` times; the round of median throughput is the level's result
            # (runs of one engine moved up to 20% on this VM; the median keeps one slow round out)
            rounds = [asyncio.run(run_level(url, args.model, c, n, args.max_tokens)) for _ in range(args.rounds)]
            rounds.sort(key=lambda r: r["throughput_tok_s"])
            level = {**rounds[len(rounds) // 2], "rounds_tok_s": [r["throughput_tok_s"] for r in rounds]}
            results.append(level)
            print(f"bench: {engine} concurrency {c}: {level['throughput_tok_s']} tok/s (rounds "
                  f"{level['rounds_tok_s']}), TPOT p50 {level['tpot_p50_ms']} ms", file=sys.stderr, flush=True)
    finally:
        exit_code = stop_server(proc)
    return {"engine": engine, "pp": int(pp), "startup_s": round(startup, 1), "server_exit_code": exit_code,
            "levels": results}


def machine_dtype(requested: str) -> str:
    """`requested`, or for auto the dtype pipesplit picks on this CPU (bfloat16 where it computes
    it natively, else float32), so that the peer runs the same one."""
    from pipesplit.runtime.dtype import choose_dtype

    return choose_dtype(requested, "cpu", "bfloat16").dtype


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--engines", default="pipesplit-pp1,pipesplit-pp2,vllm-pp1",
                        help="comma-separated: pipesplit-ppN, vllm-ppN")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="auto: what `pipesplit serve` picks on this CPU, given to both engines")
    parser.add_argument("--mem-budget", type=float, default=1.0, help="GiB per stage (CPU)")
    parser.add_argument("--concurrency", default="16", help="comma-separated levels")
    parser.add_argument("--requests", type=int, default=48, help="requests per level (0: max(8, 2 x level))")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (ignore_eos)")
    parser.add_argument("--start-timeout", type=float, default=900.0, help="seconds (vLLM compiles at start-up)")
    parser.add_argument("--peers", type=Path, default=Path(os.environ.get("PEERS") or ROOT / "bench" / ".peers"),
                        help="where vLLM's venv lives (make bench-peers)")
    parser.add_argument("--rounds", type=int, default=3, help="times each level's load runs; the median round counts")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve.json")
    args = parser.parse_args()
    args.dtype = machine_dtype(args.dtype)
    if args.rounds < 1:
        parser.error(f"--rounds is {args.rounds}; give at least 1")
    levels = [int(c) for c in args.concurrency.split(",")]
    engines = [e for e in args.engines.split(",") if e]
    bad = [e for e in engines if not re.fullmatch(r"(pipesplit|vllm)-pp[1-9]", e)]
    if bad:
        parser.error(f"engine {bad[0]!r} is not pipesplit-ppN or vllm-ppN")
    args.out.parent.mkdir(parents=True, exist_ok=True)

    runs = []
    for engine in engines:
        try:
            runs.append(run_engine(engine, args, levels))
        except Exception as exc:  # noqa: BLE001 -- a peer that fails is reported, the bench goes on
            print(f"bench: {engine} failed: {exc}", file=sys.stderr, flush=True)
            runs.append({"engine": engine, "error": f"{type(exc).__name__}: {exc}", "levels": []})

    report = {
        "bench": "serve",
        "model": args.model,
        "dtype": args.dtype,
        "mem_budget_gib": args.mem_budget,
        "device": "cpu",
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "load_average_at_end": list(os.getloadavg()),
        "metrics": "TTFT: request sent -> first text chunk; TPOT: (latency - TTFT) / (output tokens - 1); "
                   "throughput: output tokens of the level / wall time of the level",
        "runs": runs,
    }
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"{args.model}, {args.dtype}, CPU ({os.cpu_count()} cores), {args.max_tokens} output tokens per request\n")
    print(markdown(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
