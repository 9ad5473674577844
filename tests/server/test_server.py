"""`pipesplit serve` driven over real HTTP by the official `openai` client (and raw httpx).

One server (smollm2, pp 2) is shared by the module; greedy outputs are checked against
transformers (its GGUF loader, tokenizer and chat template), not against pipesplit. Tests that
stop or break a server start their own (the tiny llama with a byte-level tokenizer), so the
tests run in any order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx  # the server and test extras: missing, the module fails to import instead of skipping
import openai
import pytest

from tests.runtime.test_text import EOS_PROMPT, JAPANESE, MULTI_TURN, spanning_stop

pytestmark = pytest.mark.slow

API_KEY = "test-key"
MODEL = "smollm2"
# 0.4 GiB per stage leaves the KV pool (about 4,500 tokens) smaller than the 8,192-token context,
# so the prompt limit below is the KV capacity, not the model's context length.
MEM_BUDGET = "0.4"
START_TIMEOUT = 240.0

COMPLETION_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
CHAT_PROMPTS = ["What is 2+2?", "Name a colour."]
MAX_TOKENS = 8


# -- a server subprocess ------------------------------------------------------------------------------
class ServerProcess:
    """`python -m pipesplit serve ...` with its output collected by reader threads."""

    def __init__(self, *extra: str, model: str = MODEL, mem_budget: str = MEM_BUDGET) -> None:
        cmd = [sys.executable, "-m", "pipesplit", "serve", model, "--pp", "2", "--port", "0",
               "--mem-budget", mem_budget, "--dtype", "float32", *extra]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     cwd=Path(__file__).resolve().parents[2])
        self.stdout: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.stderr_lines: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr_lines.append), daemon=True).start()
        self._url: str | None = None
        self.max_total_num_tokens: int | None = None

    @property
    def url(self) -> str:
        """The base URL from the server's ready line (waits for it)."""
        if self._url is None:
            self._url = self._wait_ready()
        return self._url

    @staticmethod
    def _pump(stream, sink) -> None:
        for line in stream:
            sink(line)

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            try:
                line = self.stdout.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            found = re.search(r"pipesplit: serving \S+ on (http://\S+) \(pp=2, max_total_num_tokens=(\d+)\)", line)
            if found:
                self.max_total_num_tokens = int(found.group(2))
                return found.group(1)
        self.proc.kill()
        raise AssertionError(f"the server did not start; stderr:\n{self.stderr}")

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def stage_pids(self) -> list[int]:
        """The stage processes: children of the server process running pipesplit.runtime.stage."""
        pids = []
        for children in Path(f"/proc/{self.proc.pid}/task").glob("*/children"):
            pids += [int(p) for p in children.read_text().split()]
        return [p for p in pids if b"pipesplit.runtime.stage" in Path(f"/proc/{p}/cmdline").read_bytes()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _wait_exit(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError(f"the server was still running {timeout:.0f} s later") from None


# -- fixtures --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server_process(smollm2_gguf):
    srv = ServerProcess("--api-key", API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def server(server_process):
    assert server_process.url
    return server_process


def _expected(hf, ids: list[int], max_tokens: int) -> SimpleNamespace:
    out = hf.greedy(ids, max_tokens)
    reason = "stop" if out[-1] in hf.eos_token_ids else "length"
    return SimpleNamespace(prompt_token_ids=ids, token_ids=out, text=hf.text(out), finish_reason=reason)


@pytest.fixture(scope="module")
def reference(server_process, smollm2_hf):
    """transformers' greedy outputs: prompt -> (prompt ids, token ids, text, finish_reason).

    Asks for the server process only so that it is already loading meanwhile.
    """
    hf = smollm2_hf
    completion = {p: _expected(hf, hf.tokenizer.encode(p), MAX_TOKENS) for p in COMPLETION_PROMPTS}
    chat = {p: _expected(hf, hf.chat_ids([{"role": "user", "content": p}]), MAX_TOKENS) for p in CHAT_PROMPTS}
    return {"completion": completion, "chat": chat, "encoded": {p: r.prompt_token_ids for p, r in completion.items()},
            "encoded_system": hf.tokenizer.encode(SYSTEM_PROMPT)}


@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture
def http(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as c:
        yield c


def metrics(http) -> dict[str, float]:
    text = http.get("/metrics").text
    return {name: float(value) for name, value in re.findall(r"^(\S+) (\S+)$", text, flags=re.M)}


def wait_for_idle(http, timeout: float = 15.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(http)
        if m["pipesplit_kv_tokens_used"] == 0 and m["pipesplit_requests_running"] == 0:
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"KV slots still held {timeout:.0f} s later: {m}")
        time.sleep(0.1)


def long_stream(http, **extra):
    """A streaming completion that would run for thousands of tokens."""
    body = {"model": MODEL, "prompt": "Count: 1, 2, 3,", "max_tokens": 3000, "temperature": 0, "ignore_eos": True,
            "stream": True, **extra}
    return http.stream("POST", "/v1/completions", json=body)


# -- the happy paths ------------------------------------------------------------------------------------
def test_completion_matches_transformers(reference, client):
    for prompt, ref in reference["completion"].items():
        out = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS)
        choice = out.choices[0]
        assert (choice.text, choice.finish_reason) == (ref.text, ref.finish_reason)
        assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert out.usage.completion_tokens == len(ref.token_ids)
        assert out.usage.total_tokens == len(ref.prompt_token_ids) + len(ref.token_ids)
        assert out.object == "text_completion" and out.model == MODEL


def test_completion_from_token_ids(client, reference):
    prompt = COMPLETION_PROMPTS[0]
    ids = reference["encoded"][prompt]
    for given in (ids, [prompt]):
        out = client.completions.create(model=MODEL, prompt=given, temperature=0, max_tokens=MAX_TOKENS)
        assert out.choices[0].text == reference["completion"][prompt].text


def test_streamed_completion_matches(client, reference):
    prompt, ref = next(iter(reference["completion"].items()))
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS,
                                            stream=True, stream_options={"include_usage": True}))
    *token_chunks, usage_chunk = chunks
    assert "".join(c.choices[0].text for c in token_chunks) == ref.text
    assert [c.choices[0].finish_reason for c in token_chunks][-1] == ref.finish_reason
    assert all(c.choices[0].finish_reason is None for c in token_chunks[:-1])
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == len(ref.token_ids)
    assert len({c.id for c in chunks}) == 1


def test_chat_matches_transformers(client, reference):
    for prompt, ref in reference["chat"].items():
        messages = [{"role": "user", "content": prompt}]
        out = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                             max_completion_tokens=MAX_TOKENS)
        assert out.choices[0].message.role == "assistant"
        assert (out.choices[0].message.content, out.choices[0].finish_reason) == (ref.text, ref.finish_reason)
        assert out.usage.prompt_tokens == len(ref.prompt_token_ids)

        stream = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=MAX_TOKENS,
                                                stream=True)
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
        assert chunks[-1].choices[0].finish_reason == ref.finish_reason


def test_chat_with_assistant_turns_and_text_parts_matches_transformers(client, smollm2_hf):
    expected = _expected(smollm2_hf, smollm2_hf.chat_ids(MULTI_TURN), MAX_TOKENS)
    parts = [dict(m) for m in MULTI_TURN]
    parts[-1]["content"] = [{"type": "text", "text": "And of "}, {"type": "text", "text": "Spain?"}]  # joined as ""
    for messages in (MULTI_TURN, parts):
        out = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=MAX_TOKENS)
        assert out.usage.prompt_tokens == len(expected.prompt_token_ids)
        assert (out.choices[0].message.content, out.choices[0].finish_reason) == (expected.text, expected.finish_reason)


def _completion_events(http, **body) -> list[dict]:
    """The JSON events of a streamed completion (raw SSE, up to [DONE])."""
    body = {"model": MODEL, "temperature": 0, "stream": True, **body}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        data = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


@pytest.mark.parametrize("span", [2, 4])
def test_stop_string_spanning_tokens_over_http(client, http, smollm2_hf, span):
    ref = _expected(smollm2_hf, smollm2_hf.tokenizer.encode(EOS_PROMPT), 40)
    stop, cut, tokens = spanning_stop(smollm2_hf, ref.token_ids, span)
    out = client.completions.create(model=MODEL, prompt=EOS_PROMPT, temperature=0, max_tokens=40,
                                    stop=[stop, "never-produced"])
    assert (out.choices[0].text, out.choices[0].finish_reason) == (ref.text[:cut], "stop")
    assert out.usage.completion_tokens == tokens
    events = _completion_events(http, prompt=EOS_PROMPT, max_tokens=40, stop=stop)
    texts = [e["choices"][0]["text"] for e in events]
    assert "".join(texts) == ref.text[:cut] and events[-1]["choices"][0]["finish_reason"] == "stop"
    # a stop that never completes: its prefix is held back, then released; the text ends at EOS
    events = _completion_events(http, prompt=EOS_PROMPT, max_tokens=40, stop=stop + "\u2603")
    assert "".join(e["choices"][0]["text"] for e in events) == ref.text
    assert events[-1]["choices"][0]["finish_reason"] == ref.finish_reason == "stop"


def test_streamed_japanese_has_no_replacement_char(client, smollm2_hf):
    expected = _expected(smollm2_hf, smollm2_hf.chat_ids(JAPANESE), 16)
    chunks = list(client.chat.completions.create(model=MODEL, messages=JAPANESE, temperature=0, max_tokens=16,
                                                 stream=True))
    deltas = [c.choices[0].delta.content or "" for c in chunks]
    assert "".join(deltas) == expected.text and not any("\ufffd" in d for d in deltas)


def test_eos_ends_the_completion_with_stop(client, smollm2_hf):
    ref = _expected(smollm2_hf, smollm2_hf.tokenizer.encode(EOS_PROMPT), 40)
    out = client.completions.create(model=MODEL, prompt=EOS_PROMPT, temperature=0, max_tokens=40)
    assert (out.choices[0].text, out.choices[0].finish_reason) == (ref.text, "stop")
    assert out.usage.completion_tokens == len(ref.token_ids) < 40
    longer = client.completions.create(model=MODEL, prompt=EOS_PROMPT, temperature=0, max_tokens=40,
                                       extra_body={"ignore_eos": True})
    expected = smollm2_hf.greedy(ref.prompt_token_ids, 40, stop_at_eos=False)
    assert (longer.choices[0].text, longer.choices[0].finish_reason) == (smollm2_hf.text(expected), "length")


def test_seeded_sampling_repeats(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", temperature=1.0, top_p=0.9, max_tokens=12, seed=1234,
                  extra_body={"top_k": 50})
    first, second = (client.completions.create(**kwargs).choices[0].text for _ in range(2))
    assert first == second


# -- prefix caching -----------------------------------------------------------------------------------------
SYSTEM_PROMPT = ("You are a careful assistant for a railway company. Answer questions about timetables, "
                 "tickets, refunds and accessibility. Be brief, polite and precise; when you do not know, say so. ") * 3


def test_shared_prefix_is_reported_cached(client, reference):
    tokens = len(reference["encoded_system"])
    first = client.completions.create(model=MODEL, prompt=SYSTEM_PROMPT + "Q: When is the first train?",
                                      max_tokens=2, temperature=0)
    second = client.completions.create(model=MODEL, prompt=SYSTEM_PROMPT + "Q: Can I bring a bike?",
                                       max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens > tokens
    assert second.usage.prompt_tokens_details.cached_tokens >= tokens - 1
    assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens


def test_second_chat_turn_reads_the_first_from_the_cache(client):
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "Is there wifi?"}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And power sockets?"}]
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    assert usage.prompt_tokens > first.usage.prompt_tokens


def test_metrics_count_prefix_cache_hits(client, http, reference):
    before = metrics(http)
    client.completions.create(model=MODEL, prompt=SYSTEM_PROMPT + "Q: Are dogs allowed?", max_tokens=1,
                              temperature=0)
    after = metrics(http)
    looked_up = after["pipesplit_prefix_cache_queries_total"] - before["pipesplit_prefix_cache_queries_total"]
    hit = after["pipesplit_prefix_cache_hits_total"] - before["pipesplit_prefix_cache_hits_total"]
    assert looked_up > len(reference["encoded_system"]) and len(reference["encoded_system"]) - 1 <= hit < looked_up
    assert after["pipesplit_kv_tokens_cached"] > 0
    assert after["pipesplit_kv_tokens_total"] == before["pipesplit_kv_tokens_total"]  # the cache is part of the pool


def test_models_health_metrics(server, client, http, smollm2_hf):
    from pipesplit.runtime.loader import resolve_model
    from pipesplit.runtime.plan_bridge import runtime_plan

    assert [m.id for m in client.models.list().data] == [MODEL]
    assert http.get("/health").status_code == 200
    before = metrics(http)
    client.completions.create(model=MODEL, prompt="Hi", temperature=0, max_tokens=3, extra_body={"ignore_eos": True})
    m = wait_for_idle(http)
    assert m["pipesplit_generation_tokens_total"] - before["pipesplit_generation_tokens_total"] == 3
    prompt_tokens = len(smollm2_hf.tokenizer.encode("Hi"))
    assert m["pipesplit_prompt_tokens_total"] - before["pipesplit_prompt_tokens_total"] == prompt_tokens
    assert m["pipesplit_requests_finished_total"] - before["pipesplit_requests_finished_total"] == 1
    # the pool's size is the planner's prediction (and the ready line's); idle, all of it is free
    spec = resolve_model(MODEL).spec
    budget = int(float(MEM_BUDGET) * (1 << 30))
    predicted = runtime_plan(spec, 2, None, None, "float32", (budget, budget)).max_total_num_tokens
    assert m["pipesplit_kv_tokens_total"] == m["pipesplit_kv_tokens_free"] == predicted == server.max_total_num_tokens
    assert predicted < 8192  # the KV pool, not the context, binds (see MEM_BUDGET)
    assert 'pipesplit_stage_step_seconds{stage="1"}' in m and "pipesplit_preemptions_total" in m


def test_64_concurrent_streams(server, reference):
    prompts = [COMPLETION_PROMPTS[i % len(COMPLETION_PROMPTS)] for i in range(64)]

    async def one(client, prompt):
        stream = await client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS,
                                                 stream=True)
        parts, reason = [], None
        async for chunk in stream:
            parts.append(chunk.choices[0].text)
            reason = chunk.choices[0].finish_reason or reason
        return "".join(parts), reason

    async def run_all():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    results = asyncio.run(run_all())
    expected = [(reference["completion"][p].text, reference["completion"][p].finish_reason) for p in prompts]
    assert results == expected


# -- clients that leave -----------------------------------------------------------------------------------
def test_disconnect_mid_stream_frees_slots(http):
    wait_for_idle(http)
    with long_stream(http) as response:
        lines = response.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert all(line.startswith("data: ") or not line for line in got)
        assert metrics(http)["pipesplit_kv_tokens_used"] > 0
    # closing the response drops the connection; the server aborts the request
    wait_for_idle(http)


def test_disconnect_while_waiting_frees_slots(server, http):
    body = {"model": MODEL, "prompt": "Count: 1, 2, 3,", "max_tokens": 3000, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=body, timeout=2.0)
    wait_for_idle(http)


# -- bad input ------------------------------------------------------------------------------------------
BAD_REQUESTS = [
    # (path, body (dict or raw str), status, param)
    ("/v1/completions", "{not json", 400, None),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi"}, 400, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 100_000}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": [1] * 5000}, 400, "prompt"),  # > KV capacity
    ("/v1/completions", {"model": MODEL, "prompt": [1] * 9000}, 400, "prompt"),  # > context length
    ("/v1/completions", {"model": MODEL, "prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 2}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "echo": True}, 400, "echo"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "seed": -1}, 400, "seed"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "max_completion_tokens": 100_000}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                              "frequency_penalty": 1.0}, 400, "frequency_penalty"),
]


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS)
def test_bad_input_gets_4xx_and_server_keeps_serving(http, path, body, status, param):
    if isinstance(body, str):
        response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        response = http.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    good = http.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert good.status_code == 200 and good.json()["choices"][0]["text"]


def test_bad_input_through_openai_client(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=-1)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_api_key(server, http):
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert http.post("/v1/completions", json=body).status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200  # probes need no key


# -- lifecycle ------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_server(tiny_text_checkpoint):
    """A server of its own for a test that stops or breaks it: the tiny llama (byte-level tokenizer,
    32k context) at pp 2, loaded in a second."""
    srv = ServerProcess(model=str(tiny_text_checkpoint), mem_budget="0.05")
    assert srv.url
    yield srv
    srv.stop()


def tiny_long_stream(http):
    body = {"model": http.model, "prompt": "Count: 1, 2, 3,", "max_tokens": 30000, "temperature": 0,
            "ignore_eos": True, "stream": True}
    return http.stream("POST", "/v1/completions", json=body)


@pytest.fixture
def tiny_http(tiny_server, tiny_text_checkpoint):
    with httpx.Client(base_url=tiny_server.url, timeout=30) as c:
        c.model = str(tiny_text_checkpoint)
        yield c


def test_killed_stage_makes_the_server_exit_nonzero(tiny_server, tiny_http):
    srv = tiny_server
    stages = srv.stage_pids()
    assert len(stages) == 1
    with tiny_long_stream(tiny_http) as response:
        lines = response.iter_lines()
        next(lines)
        os.kill(stages[0], signal.SIGKILL)
        started = time.monotonic()
        with contextlib.suppress(httpx.TransportError):  # the server may drop the connection
            for _ in lines:  # must end, not hang
                pass
    assert time.monotonic() - started < 15
    assert _wait_exit(srv.proc, 15) != 0
    errors = [line for line in srv.stderr_lines if line.startswith("pipesplit: error: ")]
    assert len(errors) == 1 and f"stage 1 (pid {stages[0]}) was killed by SIGKILL" in errors[0], srv.stderr


def test_sigterm_aborts_requests_and_exits_zero(tiny_server, tiny_http):
    stages = tiny_server.stage_pids()
    assert stages
    with tiny_long_stream(tiny_http) as response:
        lines = response.iter_lines()
        next(lines)
        tiny_server.proc.send_signal(signal.SIGTERM)
        events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"
    assert _wait_exit(tiny_server.proc, 30) == 0
    assert not any(_alive(pid) for pid in stages)


def test_text_on_a_model_without_tokenizer_is_a_400():
    """A checkpoint without tokenizer files serves token ids; text and chat get a 400, not a 500."""
    from fastapi.testclient import TestClient

    from pipesplit.server.app import OpenAIServer, build_app

    llm = SimpleNamespace(engine=SimpleNamespace(error=None, max_context=64), tokenizer=None,
                          spec=SimpleNamespace(max_position_embeddings=64), max_total_num_tokens=64)
    with TestClient(build_app(OpenAIServer(llm, MODEL))) as test_client:
        for path, body, param in (("/v1/completions", {"prompt": "hi"}, "prompt"),
                                  ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]},
                                   "messages")):
            response = test_client.post(path, json={"model": MODEL, **body})
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == param and "no tokenizer files" in error["message"]


def test_a_template_that_raises_is_a_400():
    """The chat template's own raise_exception() reaches the client as a 400 naming the messages."""
    from fastapi.testclient import TestClient

    from pipesplit.runtime.tokenizer import Tokenizer
    from pipesplit.server.app import OpenAIServer, build_app
    from tests.conftest import byte_level_tokenizer

    template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                "{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}")
    tokenizer = Tokenizer(byte_level_tokenizer().backend_tokenizer, template, set())
    engine = SimpleNamespace(error=None, max_context=64, submit=None)
    llm = SimpleNamespace(engine=engine, tokenizer=tokenizer, spec=SimpleNamespace(max_position_embeddings=64),
                          max_total_num_tokens=64)
    with TestClient(build_app(OpenAIServer(llm, MODEL))) as test_client:
        body = {"model": MODEL, "messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "hi"}]}
        response = test_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages" and "System role not supported" in error["message"]


def test_stream_events_stay_one_line_for_every_line_splitter():
    from pipesplit.server.protocol import sse

    text = "a\u2028b\u2029c\x85d\x1ce\nf\rg"  # what a byte-level model may well emit
    event = sse({"choices": [{"text": text}]})
    data, blank = event.split("\n")[0], event.split("\n")[1:]
    assert blank == ["", ""] and len(data.splitlines()) == 1  # str.splitlines, as httpx's aiter_lines
    assert json.loads(data.removeprefix("data: "))["choices"][0]["text"] == text
