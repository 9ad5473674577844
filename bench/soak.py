"""Soak: `pipesplit serve` (PP2) under sustained mixed load on loopback, bounded in time and count.

    python bench/soak.py                     # 10 minutes, 32 clients, smollm2 -> bench/results/soak.json
    python bench/soak.py --seconds 30 --clients 8 --model path/to/checkpoint --out /tmp/soak.json

Each of --clients streaming clients loops until the deadline (or --max-requests): 10% of its
requests disconnect mid-stream, 5% are bad requests (4xx expected), the rest stream completions
or chat completions of mixed prompt and output lengths. Asserted and reported:

- no 5xx and no transport error on any request;
- every accepted request either finished (finish_reason stop/length, then [DONE]) or was
  one this client abandoned mid-stream, and the server counts each of them as finished
  (`pipesplit_requests_finished_total` == finished + abandoned);
- resident memory (server + every stage process) grows less than 5% from the end of warm-up
  to the end of the run;
- KV slots and running requests back to their idle values once the load stops;
- `/metrics` prompt tokens == the client-side sum (usage of finished requests + the known
  token-id prompts of abandoned ones); generated tokens == the finished requests' usage sum
  plus what the abandoned ones generated, which must lie between the tokens they received
  and their max_tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT_WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches "
                "in a small town near the river where old ships rest").split()
OUTPUT_LENGTHS = (4, 8, 16, 32, 64, 128)


@dataclass
class Tally:
    """Client-side counts, summed over every client."""

    requests: int = 0
    finished: int = 0
    finish_reasons: dict = field(default_factory=dict)
    abandoned: int = 0
    bad_requests: int = 0
    bad_request_statuses: dict = field(default_factory=dict)
    server_errors: int = 0
    transport_errors: int = 0
    unfinished_streams: int = 0
    prompt_tokens_finished: int = 0
    completion_tokens_finished: int = 0
    prompt_tokens_abandoned: int = 0
    chunks_seen_abandoned: int = 0
    max_tokens_abandoned: int = 0
    problems: list = field(default_factory=list)

    def problem(self, text: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(text)


# -- the server ----------------------------------------------------------------------------------------
def start_server(args) -> tuple[subprocess.Popen, str, list[str]]:
    cmd = [sys.executable, "-m", "pipesplit", "serve", args.model, "--pp", str(args.pp), "--host", "127.0.0.1",
           "--port", "0", "--served-model-name", "soak", *args.serve_args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        found = re.search(r"pipesplit: serving \S+ on (http://\S+) ", line)
        if found:
            threading.Thread(target=lambda: proc.stdout.read(), daemon=True).start()
            return proc, found.group(1), stderr
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"the server did not start:\n{''.join(stderr)}")


def process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            todo += [int(c) for c in children.read_text().split()]
    return pids


def rss_bytes(pid: int) -> dict[int, int]:
    """Resident bytes of the server and each process under it."""
    out = {}
    for p in process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[p] = int(line.split()[1]) * 1024
        except FileNotFoundError:
            pass
    return out


def parse_metrics(text: str) -> dict[str, float]:
    return {name: float(value) for name, value in re.findall(r"^(\w+) (\S+)$", text, flags=re.M)}


# -- the clients -------------------------------------------------------------------------------------
def bad_request(rng: random.Random) -> tuple[str, bytes]:
    """A request the server must refuse with a 4xx."""
    choices = [
        ("/v1/completions", b'{"model": "soak", "prompt": '),  # truncated JSON
        ("/v1/completions", json.dumps({"model": "nope", "prompt": "hi"}).encode()),
        ("/v1/completions", json.dumps({"model": "soak", "prompt": "hi", "max_tokens": -3}).encode()),
        ("/v1/chat/completions", json.dumps({"model": "soak", "messages": []}).encode()),
        ("/v1/chat/completions", json.dumps({"model": "soak", "messages": [{"role": "user", "content": "x"}],
                                             "n": 3}).encode()),
        ("/v1/completions", json.dumps({"model": "soak", "prompt": "x" * (2**20 + 10)}).encode()),  # 413
        ("/v1/completions", json.dumps({"model": "soak", "prompt": [1] * 100_000}).encode()),  # too long
        ("/v1/completions", b'{"model": "soak", "prompt": "\xff\xfe"}'),  # not UTF-8
    ]
    return rng.choice(choices)


def prompt_text(rng: random.Random) -> str:
    return " ".join(rng.choice(PROMPT_WORDS) for _ in range(rng.choice((2, 8, 32, 96))))


async def one_request(http, rng: random.Random, tally: Tally, vocab: int) -> None:
    import httpx

    tally.requests += 1
    roll = rng.random()
    if roll < 0.05:
        path, raw = bad_request(rng)
        try:
            response = await http.post(path, content=raw, headers={"Content-Type": "application/json"})
        except httpx.TransportError as exc:
            tally.transport_errors += 1
            tally.problem(f"bad request: transport error {exc!r}")
            return
        tally.bad_requests += 1
        tally.bad_request_statuses[response.status_code] = tally.bad_request_statuses.get(response.status_code, 0) + 1
        if response.status_code >= 500:
            tally.server_errors += 1
            tally.problem(f"bad request got {response.status_code}: {response.text[:200]}")
        elif not 400 <= response.status_code < 500 or "error" not in response.json():
            tally.problem(f"bad request got {response.status_code}: {response.text[:200]}")
        return
    abandon = roll < 0.15
    max_tokens = rng.choice(OUTPUT_LENGTHS)
    if abandon:  # token ids: the client knows the prompt length the server counts
        path = "/v1/completions"
        prompt_ids = [rng.randrange(vocab) for _ in range(rng.choice((4, 16, 64)))]
        body = {"model": "soak", "prompt": prompt_ids, "max_tokens": max(max_tokens, 32), "ignore_eos": True}
    elif rng.random() < 0.5:
        path = "/v1/completions"
        body = {"model": "soak", "prompt": prompt_text(rng), "max_tokens": max_tokens}
    else:
        path = "/v1/chat/completions"
        body = {"model": "soak", "messages": [{"role": "user", "content": prompt_text(rng)}], "max_tokens": max_tokens}
    body.update(stream=True, stream_options={"include_usage": True}, temperature=rng.choice((0.0, 0.7, 1.0)),
                seed=rng.randrange(2**31))
    stop_after = rng.randint(1, 3) if abandon else None
    events, chunks = [], 0
    try:
        async with http.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                if response.status_code >= 500:
                    tally.server_errors += 1
                tally.problem(f"good request got {response.status_code}: {text[:200]}")
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line[len("data: "):])
                if events[-1] != "[DONE]":
                    data = json.loads(events[-1])
                    if "error" in data:
                        tally.server_errors += 1
                        tally.problem(f"stream error event: {events[-1][:200]}")
                    choice = (data.get("choices") or [{}])[0]
                    if choice.get("text") or (choice.get("delta") or {}).get("content"):
                        chunks += 1
                if stop_after is not None and chunks >= stop_after:
                    break  # leaving the block closes the connection mid-stream
    except httpx.TransportError as exc:
        tally.transport_errors += 1
        tally.problem(f"transport error {exc!r}")
        return
    if stop_after is not None and chunks >= stop_after:
        tally.abandoned += 1
        tally.prompt_tokens_abandoned += len(body["prompt"])
        tally.chunks_seen_abandoned += chunks
        tally.max_tokens_abandoned += body["max_tokens"]
        return
    if len(events) < 2 or events[-1] != "[DONE]":
        tally.unfinished_streams += 1
        tally.problem(f"stream ended without [DONE]: {events[-3:]}")
        return
    usage = json.loads(events[-2]).get("usage")
    reasons = [json.loads(e)["choices"][0].get("finish_reason") for e in events[:-1]
               if json.loads(e).get("choices")]
    reason = next((r for r in reversed(reasons) if r), None)
    if reason not in ("stop", "length") or not usage:
        tally.unfinished_streams += 1
        tally.problem(f"stream finished with {reason!r}, usage {usage}")
        return
    tally.finished += 1
    tally.finish_reasons[reason] = tally.finish_reasons.get(reason, 0) + 1
    tally.prompt_tokens_finished += usage["prompt_tokens"]
    tally.completion_tokens_finished += usage["completion_tokens"]


async def client(i: int, url: str, deadline: float, budget: list[int], tally: Tally, seed: int, vocab: int) -> None:
    import httpx

    rng = random.Random(seed * 1000 + i)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600.0, connect=10.0)) as http:
        while time.monotonic() < deadline and budget[0] > 0:
            budget[0] -= 1
            await one_request(http, rng, tally, vocab)


async def sample_rss(pid: int, stop: asyncio.Event, samples: list, every: float) -> None:
    started = time.monotonic()
    while not stop.is_set():
        per_process = rss_bytes(pid)
        samples.append((round(time.monotonic() - started, 1), sum(per_process.values()), len(per_process)))
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass


async def metrics(url: str) -> dict[str, float]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        return parse_metrics((await http.get("/metrics")).text)


async def wait_idle(url: str, idle: dict[str, float], timeout: float = 60) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = await metrics(url)
        keys = ("pipesplit_kv_tokens_used", "pipesplit_requests_running", "pipesplit_requests_waiting")
        if all(m[k] == idle[k] for k in keys) or time.monotonic() > deadline:
            return m
        await asyncio.sleep(0.2)


async def soak(args, url: str, pid: int) -> dict:
    idle = await metrics(url)
    vocab = int(args.vocab)
    tally = Tally()
    rss: list = []
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(sample_rss(pid, stop, rss, args.rss_every))
    started = time.monotonic()
    deadline = started + args.seconds
    budget = [args.max_requests]
    await asyncio.gather(*(client(i, url, deadline, budget, tally, args.seed, vocab) for i in range(args.clients)))
    load_seconds = time.monotonic() - started
    after = await wait_idle(url, idle)
    stop.set()
    await sampler
    return {"tally": tally, "idle_before": idle, "after": after, "rss": rss, "load_seconds": load_seconds}


def judge(args, run: dict, exit_code: int | None) -> dict:
    tally: Tally = run["tally"]
    idle, after, rss = run["idle_before"], run["after"], run["rss"]

    def delta(name: str) -> float:
        return after[name] - idle[name]

    warm = [r for t, r, _ in rss if t <= args.warmup]
    rss_warm = statistics.median(warm[-3:]) if warm else rss[0][1]
    rss_end = statistics.median(r for _, r, _ in rss[-3:])
    growth = (rss_end - rss_warm) / rss_warm
    generated = delta("pipesplit_generation_tokens_total")
    generated_by_abandoned = generated - tally.completion_tokens_finished
    checks = {
        "no 5xx": tally.server_errors == 0,
        "no transport errors": tally.transport_errors == 0,
        "every accepted stream finished or was abandoned": tally.unfinished_streams == 0,
        "server counted every accepted request as finished":
            delta("pipesplit_requests_finished_total") == tally.finished + tally.abandoned,
        "rss growth after warm-up < 5%": growth < 0.05,
        "kv slots back to idle": after["pipesplit_kv_tokens_used"] == idle["pipesplit_kv_tokens_used"]
            and after["pipesplit_requests_running"] == 0 and after["pipesplit_requests_waiting"] == 0,
        "prompt tokens == client sum":
            delta("pipesplit_prompt_tokens_total") == tally.prompt_tokens_finished + tally.prompt_tokens_abandoned,
        "generated tokens == client sum (abandoned ones within [seen, max_tokens])":
            tally.chunks_seen_abandoned <= generated_by_abandoned <= tally.max_tokens_abandoned,
        "server exited 0 on SIGTERM": exit_code == 0,
    }
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "load_seconds": round(run["load_seconds"], 1),
        "client": asdict(tally),
        "server_metrics_delta": {k: delta(k) for k in after if k.endswith("_total") and k != "pipesplit_kv_tokens_total"},
        "generated_tokens_by_abandoned_requests": generated_by_abandoned,
        "output_tokens_per_second": round(generated / run["load_seconds"], 2),
        "requests_per_second": round((tally.finished + tally.abandoned) / run["load_seconds"], 3),
        "rss_bytes": {"after_warmup": int(rss_warm), "end": int(rss_end), "growth": round(growth, 4),
                      "processes": rss[-1][2], "samples": rss},
        "kv_tokens_used": {"idle_before": idle["pipesplit_kv_tokens_used"], "after": after["pipesplit_kv_tokens_used"]},
        "checks": checks,
        "passed": all(checks.values()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="soak pipesplit serve on loopback")
    parser.add_argument("--seconds", type=float, default=600, help="load duration (default 600)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=49152, help="token ids of abandoned requests are below this")
    parser.add_argument("--warmup", type=float, default=None, help="seconds of warm-up (default: 10%% of --seconds)")
    parser.add_argument("--rss-every", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench/results/soak.json"))
    parser.add_argument("serve_args", nargs="*", help="after --: extra `pipesplit serve` flags")
    args = parser.parse_args(argv)
    args.warmup = args.seconds * 0.1 if args.warmup is None else args.warmup
    if not args.serve_args:
        args.serve_args = ["--mem-budget", "0.5"]
    proc, url, stderr = start_server(args)
    try:
        run = asyncio.run(soak(args, url, proc.pid))
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    report = judge(args, run, exit_code)
    report["server_stderr_tail"] = "".join(stderr)[-2000:]
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    tally = run["tally"]
    print(f"soak {report['load_seconds']} s, {args.clients} clients: {tally.requests} requests "
          f"({tally.finished} finished, {tally.abandoned} abandoned, {tally.bad_requests} bad), "
          f"{report['output_tokens_per_second']} output tok/s, RSS growth {report['rss_bytes']['growth']:+.2%}")
    for name, ok in report["checks"].items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
