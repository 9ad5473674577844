"""Random request bodies against the two POST endpoints: never a 5xx, always an OpenAI error body.

The app runs in this process (Starlette's TestClient) over a real engine: a tiny random llama
(context 256, so any accepted request finishes in well under a second) with a byte-level
tokenizer of exactly its 256 ids and a chat template. After every example the next good request
must still be answered. A smaller part runs against a real `pipesplit serve` process.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PATHS = ("/v1/completions", "/v1/chat/completions")
MODEL = "tiny"
GOOD = {
    "/v1/completions": {"model": MODEL, "prompt": "hello", "max_tokens": 3, "temperature": 0},
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
}
MAX_REQUEST_BYTES = 64 * 1024


@pytest.fixture(scope="module")
def tiny_llm(tiny_with_tokenizer):
    from pipesplit import LLM

    with LLM(str(tiny_with_tokenizer), pp=1, mem_budget_gib=0.01, threads=1, log=False) as llm:
        yield llm


def in_process_client(llm, **limits):
    from fastapi.testclient import TestClient

    from pipesplit.server.app import OpenAIServer, build_app
    from pipesplit.server.limits import ServerLimits

    return TestClient(build_app(OpenAIServer(llm, MODEL, limits=ServerLimits(**limits))), raise_server_exceptions=False)


@pytest.fixture(scope="module")
def app_client(tiny_llm):
    with in_process_client(tiny_llm, max_request_bytes=MAX_REQUEST_BYTES) as client:
        yield client


def assert_openai_answer(status: int, content: bytes, path: str) -> None:
    assert status < 500, (status, content[:500])
    if status == 200 and content.startswith(b"data: "):  # a fuzzed body may ask for a stream
        events = [line[len(b"data: "):] for line in content.split(b"\n") if line.startswith(b"data: ")]
        assert events[-1] == b"[DONE]", content[-300:]
        chunks = [json.loads(event) for event in events[:-1]]
        assert chunks and all("error" not in chunk for chunk in chunks), content[:300]
        return
    body = json.loads(content)
    if status >= 400:
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}, body
        assert isinstance(error["message"], str) and error["message"] and "\n" not in error["message"]
        return
    assert status == 200, (status, content[:300])
    if "chat" in path:
        assert body["object"] == "chat.completion" and isinstance(body["choices"][0]["message"]["content"], str)
    else:
        assert body["object"] == "text_completion" and isinstance(body["choices"][0]["text"], str)


def assert_good_request_answered(client) -> None:
    for path, body in GOOD.items():
        response = client.post(path, json=body)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 3


# -- strategies -----------------------------------------------------------------------------------
numbers = st.one_of(st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=False, allow_infinity=False),
                    st.sampled_from([0, -1, 1, 2**31, 2**63, 2**64, -(2**63), 1e308, -1e-308, 0.5]))
texts = st.one_of(st.text(max_size=40), st.text(alphabet=st.characters(codec="utf-8"), min_size=2000, max_size=4000),
                  st.sampled_from(["", "\ud800", "\x00", "<user>", "{{ 7*7 }}", "{% raise %}"]))
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                              st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                           max_leaves=12)
FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "stop", "seed", "stream", "stream_options", "n", "logprobs", "echo", "ignore_eos", "logit_bias", "tools"]


def deep(depth: int) -> str:
    return "[" * depth + "]" * depth


@st.composite
def bodies(draw) -> bytes:
    """Raw request bodies: a good body with fields replaced or dropped, arbitrary JSON, deep nesting,
    invalid UTF-8, or a body over the size limit."""
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "any_json", "deep", "bad_utf8", "huge", "messages"]))
    path = draw(st.sampled_from(PATHS))
    if kind in ("mutated", "messages"):
        body = dict(GOOD[path])
        for name in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=4, unique=True)):
            if draw(st.booleans()) and name in body:
                del body[name]
            else:
                body[name] = draw(json_values)
        if kind == "messages":
            message = {"role": draw(st.one_of(st.sampled_from(["user", "system", "assistant", "tool"]), json_values)),
                       "content": draw(st.one_of(texts, json_values, st.just([{"type": "text", "text": "x"}])))}
            body["messages"] = [message] * draw(st.integers(0, 3))
        return path, json.dumps(body).encode()
    if kind == "any_json":
        return path, json.dumps(draw(json_values)).encode()
    if kind == "deep":
        depth = draw(st.sampled_from([100, 1000, 100_000]))
        return path, ('{"model": "tiny", "prompt": ' + deep(depth) + "}").encode()
    if kind == "bad_utf8":
        raw = json.dumps(GOOD[path]).encode()
        cut = draw(st.integers(1, len(raw) - 1))
        return path, raw[:cut] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80\x80"])) + raw[cut:]
    body = dict(GOOD[path])
    body["prompt" if "chat" not in path else "user"] = "x" * (MAX_REQUEST_BYTES + draw(st.integers(1, 10_000)))
    return path, json.dumps(body).encode()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                  HealthCheck.function_scoped_fixture])
@given(case=bodies())
def test_fuzzed_bodies_get_4xx_or_an_answer(app_client, case):
    path, raw = case
    response = app_client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert_openai_answer(response.status_code, response.content, path)
    if len(raw) > MAX_REQUEST_BYTES:
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_good_requests_still_answered_after_fuzzing(app_client):
    assert_good_request_answered(app_client)


def _prompt_tokens(client) -> float:
    text = client.get("/metrics").text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("pipesplit_prompt_tokens_total")))


def test_limits_reject_before_the_engine_sees_the_request(app_client):
    before = _prompt_tokens(app_client)
    big = {**GOOD["/v1/completions"], "prompt": "y" * MAX_REQUEST_BYTES}
    response = app_client.post("/v1/completions", json=big)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    # the body is within the limit, but the text cannot fit the context (255 tokens here)
    for path, body in (("/v1/completions", {**GOOD["/v1/completions"], "prompt": "z" * 20_000}),
                       ("/v1/chat/completions", {**GOOD["/v1/chat/completions"],
                                                 "messages": [{"role": "user", "content": "z" * 20_000}]})):
        response = app_client.post(path, json=body)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "context_length_exceeded"
    # 300 token ids: over the context, rejected after counting, still before submission
    response = app_client.post("/v1/completions", json={**GOOD["/v1/completions"], "prompt": [1] * 300})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
    assert _prompt_tokens(app_client) == before  # no prompt token reached the engine
    assert_good_request_answered(app_client)


def test_max_prompt_tokens_flag_limits_prompts(tiny_llm):
    with in_process_client(tiny_llm, max_prompt_tokens=10) as client:
        ok = client.post("/v1/completions", json={**GOOD["/v1/completions"], "prompt": [5] * 10})
        assert ok.status_code == 200, ok.text
        over = client.post("/v1/completions", json={**GOOD["/v1/completions"], "prompt": [5] * 11})
        assert over.status_code == 400 and "--max-prompt-tokens" in over.json()["error"]["message"]
        # 11 bytes of text are 11 tokens with this tokenizer (one per byte)
        text = client.post("/v1/completions", json={**GOOD["/v1/completions"], "prompt": "a" * 11})
        assert text.status_code == 400 and text.json()["error"]["param"] == "prompt"


# -- a smaller part against the real server ----------------------------------------------------------------
@pytest.mark.slow
def test_fuzz_against_the_real_server(tiny_with_tokenizer):
    import re

    import httpx

    proc = subprocess.Popen(
        [sys.executable, "-m", "pipesplit", "serve", str(tiny_with_tokenizer), "--pp", "2", "--port", "0",
         "--mem-budget", "0.01", "--threads", "1", "--served-model-name", MODEL,
         "--max-request-bytes", str(MAX_REQUEST_BYTES)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        found = re.search(r"on (http://\S+) ", line)
        assert found, line + proc.stderr.read() if proc.poll() is not None else line
        url = found.group(1)
        with httpx.Client(base_url=url, timeout=30) as http:

            @settings(max_examples=40, deadline=None, database=None,
                      suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
            @given(case=bodies())
            def run(case):
                path, raw = case
                response = http.post(path, content=raw, headers={"Content-Type": "application/json"})
                assert_openai_answer(response.status_code, response.content, path)

            run()
            assert_good_request_answered(http)
            assert proc.poll() is None
    finally:
        proc.terminate()
        try:
            assert proc.wait(30) == 0
        finally:
            proc.kill()

