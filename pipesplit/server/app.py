"""`pipesplit serve`: an OpenAI-compatible HTTP API over the engine.

Hops: HTTP request -> pydantic request model -> prompt ids + `SamplingParams` -> `Engine.submit`;
the engine thread hands each `RequestOutput` to the event loop (`_Job`), which answers with one
JSON body or with server-sent events. Routes: /v1/completions, /v1/chat/completions, /v1/models,
/health, /metrics. The loop is uvloop's and uvicorn parses HTTP with httptools where they are
installed (the `server` extra, as vLLM's server runs): on the 2-core Zen 3 they left the engine
thread more of the cores than asyncio's loop with h11 did.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from pipesplit.errors import UserError
from pipesplit.server.limits import ServerLimits
from pipesplit.server.protocol import (
    COMPLETIONS_DEFAULT_MAX_TOKENS,
    GREEDY_TEMPERATURE,
    APIError,
    ChatCompletionRequest,
    ChatRender,
    CompletionRender,
    CompletionRequest,
    EngineGone,
    Render,
    RequestBody,
    engine_unavailable,
    first_line,
    sse,
    usage_body,
    validation_message,
)


# -- one request in the engine -------------------------------------------------------------------------
class _Job:
    """A submitted request: the engine thread puts its outputs on an asyncio queue.

    Leaving `outputs()` early (client gone, task cancelled) aborts the request, which frees its
    KV slots. A `None` on the queue means the engine died.
    """

    def __init__(self, api: "OpenAIServer", prompt_ids: list[int], params) -> None:
        loop = asyncio.get_running_loop()
        self.api = api
        self.prompt_ids = prompt_ids
        self.queue: asyncio.Queue = asyncio.Queue()
        self.finished = False

        def deliver(output) -> None:  # engine thread: must never raise into the engine
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server is gone
                loop.call_soon_threadsafe(self.queue.put_nowait, output)

        self.req_id = api.engine.submit(prompt_ids, params, deliver)
        api.inflight[self.req_id] = self.queue

    async def outputs(self) -> AsyncIterator:
        try:
            while True:
                output = await self.queue.get()
                if output is None or (output.finished and output.finish_reason == "abort" and self.api.engine.error):
                    raise EngineGone(first_line(self.api.engine.error))
                yield output
                if output.finished:
                    self.finished = True
                    return
        finally:
            self.api.inflight.pop(self.req_id, None)
            if not self.finished:
                self.api.engine.abort(self.req_id)

    async def final(self):
        output = None
        async for output in self.outputs():
            pass
        return output


# -- the API -------------------------------------------------------------------------------------------
class OpenAIServer:
    """The HTTP front of one `LLM`: validates requests, submits them, shapes the answers."""

    def __init__(self, llm, served_model_name: str, api_key: str | None = None,
                 limits: ServerLimits = ServerLimits()) -> None:
        self.llm = llm
        self.engine = llm.engine
        self.served_model_name = served_model_name
        self.api_key = api_key
        self.limits = limits
        self._longest_token_bytes: int | None = None
        self.created = int(time.time())
        self.inflight: dict[int, asyncio.Queue] = {}
        self.stopping: str | None = None  # why new requests are refused, once shutting down

    # -- lifecycle ------------------------------------------------------------------------------------
    def stop_accepting(self, reason: str) -> None:
        """Refuse new requests and abort the running ones (they finish with finish_reason "abort")."""
        self.stopping = self.stopping or reason
        for req_id in list(self.inflight):
            self.engine.abort(req_id)

    def engine_died(self) -> None:
        """Wake every waiting request: the engine will not answer them."""
        self.stop_accepting(f"the engine died: {first_line(self.engine.error)}")
        for queue in self.inflight.values():
            queue.put_nowait(None)

    def unhealthy_reason(self) -> str | None:
        """None while every stage is loaded and alive and requests are accepted."""
        if self.engine.error is not None:
            return f"the engine died: {first_line(self.engine.error)}"
        return self.stopping

    # -- request -> engine ----------------------------------------------------------------------------
    def check_request(self, body: RequestBody) -> None:
        """The served model, and only fields the engine supports."""
        if body.model != self.served_model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {self.served_model_name!r}",
                           param="model", code="model_not_found")
        for param, why in body.unsupported():
            raise APIError(400, why, param=param, code="unsupported_parameter")

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt accepted: --max-prompt-tokens, at most the context minus one."""
        fits = self.engine.max_context - 1
        return fits if self.limits.max_prompt_tokens is None else min(self.limits.max_prompt_tokens, fits)

    def _check_text(self, text: str, param: str) -> None:
        """Rejects text the tokenizer cannot take (a lone surrogate from a JSON escape such as
        "\\ud800"), and text that must exceed max_prompt_tokens, without tokenizing it: no token
        covers more UTF-8 bytes than the vocabulary's longest entry."""
        try:
            size = len(text.encode())
        except UnicodeEncodeError as exc:
            raise APIError(400, f"the text holds {text[exc.start]!r} at character {exc.start}, a lone surrogate that "
                           "is not Unicode text; send valid UTF-8", param=param) from None
        if self._longest_token_bytes is None:
            vocab = self.llm.tokenizer.backend.get_vocab(with_added_tokens=True)
            self._longest_token_bytes = max((len(t.encode(errors="replace")) for t in vocab), default=1)
        limit = self.max_prompt_tokens * self._longest_token_bytes
        if size > limit:
            raise APIError(400, f"the prompt is {size} bytes of text, more than {self.max_prompt_tokens} tokens "
                           f"can hold (at most {limit} bytes); shorten the prompt", param=param,
                           code="context_length_exceeded")

    def _tokenizer(self, param: str):
        """The model's tokenizer; a checkpoint without tokenizer files only takes token ids."""
        if self.llm.tokenizer is None:
            raise APIError(400, f"{self.served_model_name} has no tokenizer files; send the prompt as token ids "
                           "to /v1/completions", param=param)
        return self.llm.tokenizer

    def completion_prompt(self, body: CompletionRequest) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, f"got {len(prompt)} prompts; send one prompt per request", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            tokenizer = self._tokenizer("prompt")
            self._check_text(prompt, "prompt")
            return tokenizer.encode(prompt)
        return list(prompt)

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        from jinja2.exceptions import TemplateError  # the chat template's own raise_exception()

        tokenizer = self._tokenizer("messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = tokenizer.render_chat(messages)
        except (UserError, TemplateError) as exc:
            raise APIError(400, f"the chat template refused the messages: {exc}", param="messages") from None
        self._check_text(text, "messages")
        return list(tokenizer.backend.encode(text, add_special_tokens=False).ids)

    def sampling_params(self, body: RequestBody, prompt_len: int, default_max_tokens: int | None, prompt_param: str):
        from pipesplit.runtime.sampler import SamplingParams

        max_context = self.engine.max_context
        if prompt_len >= max_context:
            raise APIError(
                400,
                f"the prompt has {prompt_len} tokens but this server fits at most {max_context - 1} "
                f"(context {max_context} tokens: the smaller of the model's {self.llm.spec.max_position_embeddings} "
                f"and the KV capacity {self.llm.max_total_num_tokens}); shorten the prompt",
                param=prompt_param, code="context_length_exceeded",
            )
        if prompt_len > self.max_prompt_tokens:
            raise APIError(400, f"the prompt has {prompt_len} tokens but this server accepts at most "
                           f"{self.max_prompt_tokens} (--max-prompt-tokens); shorten the prompt",
                           param=prompt_param, code="context_length_exceeded")
        room = max_context - prompt_len
        max_tokens, field = body.requested_max_tokens()
        if max_tokens is None:
            max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
        elif max_tokens < 1:
            raise APIError(400, f"{field} must be at least 1, got {max_tokens}", param=field)
        elif max_tokens > room:
            raise APIError(
                400,
                f"the context holds {max_context} tokens but {prompt_len + max_tokens} were requested "
                f"({prompt_len} in the prompt, {max_tokens} to generate); lower {field} to at most {room}",
                param=field, code="context_length_exceeded",
            )
        temperature = 1.0 if body.temperature is None else body.temperature
        top_k = body.top_k if body.top_k not in (None, -1) else 0
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        try:
            return SamplingParams(
                temperature=0.0 if 0 <= temperature < GREEDY_TEMPERATURE else temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                top_k=top_k,
                max_tokens=max_tokens,
                stop=tuple(stop),
                seed=body.seed,
                ignore_eos=body.ignore_eos,
            )
        except UserError as exc:
            first_word = str(exc).split(" ", 1)[0]
            raise APIError(400, str(exc), param=first_word if first_word in type(body).model_fields else None) from None

    def submit(self, prompt_ids: list[int], params, prompt_param: str) -> _Job:
        from pipesplit.runtime.engine import EngineDeadError

        if self.stopping is not None:
            raise engine_unavailable(self.stopping)
        try:
            return _Job(self, prompt_ids, params)
        except UserError as exc:
            raise APIError(400, str(exc), param=prompt_param) from None
        except EngineDeadError as exc:
            raise engine_unavailable(f"the engine died: {first_line(exc)}") from None

    # -- engine -> response ---------------------------------------------------------------------------
    async def respond(self, request, body: RequestBody, prompt_ids: list[int], params, render: Render, prompt_param: str):
        job = self.submit(prompt_ids, params, prompt_param)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                self._stream(job, render, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        final = await self._final_unless_disconnected(job, request)
        if final is None:  # the client left; nobody reads this
            return JSONResponse({}, status_code=499)
        usage = usage_body(len(prompt_ids), len(final.token_ids), final.num_cached_tokens)
        return render.full(final.text, final.finish_reason, usage)

    async def _final_unless_disconnected(self, job: _Job, request):
        collect = asyncio.ensure_future(job.final())
        while True:
            done, _ = await asyncio.wait({collect}, timeout=1.0)
            if done:
                try:
                    return collect.result()
                except EngineGone as exc:
                    raise engine_unavailable(f"the engine died: {exc}") from None
            if await request.is_disconnected():
                collect.cancel()  # leaves job.outputs(), which aborts the request
                with contextlib.suppress(asyncio.CancelledError, EngineGone):
                    await collect
                return None

    async def _stream(self, job: _Job, render: Render, include_usage: bool) -> AsyncIterator[str]:
        for chunk in render.opening_chunks(include_usage):
            yield sse(chunk)
        try:
            output = None
            async for output in job.outputs():
                if output.delta_text or output.finished:
                    yield sse(render.chunk(output.delta_text, output.finish_reason, include_usage))
            if include_usage and output is not None:
                usage = usage_body(len(job.prompt_ids), len(output.token_ids), output.num_cached_tokens)
                yield sse(render.usage_chunk(usage))
        except EngineGone as exc:
            yield sse(engine_unavailable(f"the engine died: {exc}").body())
        yield sse("[DONE]")

    # -- read-only endpoints --------------------------------------------------------------------------
    def models(self) -> dict:
        card = {"id": self.served_model_name, "object": "model", "created": self.created, "owned_by": "pipesplit",
                "max_model_len": self.engine.max_context}
        return {"object": "list", "data": [card]}

    def metrics(self) -> str:
        usage = self.engine.usage()
        stats = self.engine.stats
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
            lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}"])
            lines.extend(f"{name}{labels} {value}" for labels, value in samples)

        metric("pipesplit_requests_running", "gauge", "Requests being decoded.", [("", usage["running"])])
        metric("pipesplit_requests_waiting", "gauge", "Requests waiting to be scheduled.", [("", usage["waiting"])])
        metric("pipesplit_kv_tokens_used", "gauge", "KV cache token slots read by requests.",
               [("", usage["kv_tokens_used"])])
        metric("pipesplit_kv_tokens_free", "gauge", "KV cache token slots free (cached tokens no request reads included).",
               [("", usage["kv_tokens_free"])])
        metric("pipesplit_kv_tokens_total", "gauge", "KV cache token slots (max_total_num_tokens).",
               [("", self.llm.max_total_num_tokens)])
        metric("pipesplit_generation_tokens_total", "counter", "Tokens generated.", [("", stats.generated_tokens)])
        metric("pipesplit_prompt_tokens_total", "counter", "Prompt tokens received.", [("", stats.prompt_tokens)])
        metric("pipesplit_requests_finished_total", "counter", "Requests finished (any reason).",
               [("", stats.finished_requests)])
        metric("pipesplit_preemptions_total", "counter", "Requests preempted to free KV slots.",
               [("", stats.preemptions)])
        metric("pipesplit_prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
               [("", stats.prefix_cache_queried_tokens)])
        metric("pipesplit_prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.",
               [("", stats.prefix_cache_hit_tokens)])
        metric("pipesplit_kv_tokens_cached", "gauge", "KV token slots held by the prefix cache (part of the pool).",
               [("", usage["kv_tokens_cached"])])
        metric("pipesplit_stage_step_seconds", "gauge", "Seconds per micro-batch step of each stage (moving average).",
               [(f'{{stage="{i}"}}', s) for i, s in enumerate(stats.stage_step_seconds)])
        return "\n".join(lines) + "\n"


# -- the ASGI app -----------------------------------------------------------------------------------------
class BearerAuth:
    """ASGI middleware: /v1/* needs `Authorization: Bearer <api key>`; /health and /metrics stay open."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = APIError(401, "missing or incorrect API key; send the header 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


DRAIN_BYTES_PER_LIMIT = 16  # a refused body is read and dropped up to 16x the limit, then the connection closes


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is answered 413, one that is not UTF-8
    400, before anything parses it."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
        body, replayed = b"".join(chunks), False
        try:
            body.decode()
        except UnicodeDecodeError as exc:
            error = APIError(400, f"the request body is not valid UTF-8 (byte {exc.start}); send JSON encoded as UTF-8")
            await JSONResponse(error.body(), status_code=400)(scope, receive, send)
            return

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: waits for http.disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send) -> None:
        # Read (and drop) the rest of the body first, up to a bound: closing a connection with unread
        # bytes makes the kernel reset it, and the client would see a broken connection, not the 413.
        drained, more = 0, True
        while more and drained < DRAIN_BYTES_PER_LIMIT * self.max_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)
        error = APIError(413, f"the request body is larger than {self.max_bytes} bytes; send less or raise "
                         "--max-request-bytes", code="request_too_large")
        await JSONResponse(error.body(), status_code=413, headers={"Connection": "close"})(scope, receive, send)


def build_app(api: OpenAIServer):
    app = FastAPI(title="pipesplit", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def on_api_error(_: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, exc: RequestValidationError):
        message, param = validation_message(list(exc.errors()))
        return JSONResponse(APIError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def on_http_error(_: Request, exc: HTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), type=kind).body(), status_code=exc.status_code)

    async def answer(body: RequestBody, request: Request, prompt_ids: list[int], default_max_tokens: int | None,
                     render: Render, prompt_param: str):
        params = api.sampling_params(body, len(prompt_ids), default_max_tokens, prompt_param)
        return await api.respond(request, body, prompt_ids, params, render, prompt_param)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        api.check_request(body)
        render = CompletionRender(api.served_model_name)
        return await answer(body, request, api.completion_prompt(body), COMPLETIONS_DEFAULT_MAX_TOKENS, render, "prompt")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        api.check_request(body)
        return await answer(body, request, api.chat_prompt(body), None, ChatRender(api.served_model_name), "messages")

    @app.get("/v1/models")
    async def models():
        return api.models()

    @app.get("/health")
    async def health():
        reason = api.unhealthy_reason()
        if reason is None:
            return {"status": "ok"}
        return JSONResponse(engine_unavailable(reason).body(), status_code=503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(api.metrics(), media_type="text/plain; version=0.0.4")

    app.add_middleware(BodyLimit, max_bytes=api.limits.max_request_bytes)
    if api.api_key:  # added last, so it runs first: an unauthenticated body is never read
        app.add_middleware(BearerAuth, api_key=api.api_key)
    return app


# -- the process -----------------------------------------------------------------------------------------
def bind_socket(host: str, port: int) -> socket.socket:
    """Binds before the model loads, so a port in use fails fast with a clear message."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({exc.strerror}); pick another --port or --host") from None
    sock.set_inheritable(False)
    return sock


def _uvicorn_server(app, on_signal: Callable[[int], None]):
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn, except that SIGINT/SIGTERM go to `on_signal` and are not re-raised at exit."""

        @contextlib.contextmanager
        def capture_signals(self):
            ours = lambda sig, _frame: on_signal(sig)  # noqa: E731
            previous = {sig: signal.signal(sig, ours) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, theirs in previous.items():
                    signal.signal(sig, theirs)

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=10)
    return Server(config)


async def run_server(api: OpenAIServer, sock: socket.socket, ready_line: Callable[[int], str]) -> int:
    """Serves until a signal (exit 0) or until the engine dies (exit 1).

    After the engine dies the server stays up for `limits.unhealthy_seconds`, answering 503 on /health
    and on every request, so that a load balancer's probe sees the failure before the port closes.
    Open streams get their error event at once, not at the end of that window.
    """
    exit_code = 0
    died_at: float | None = None
    loop = asyncio.get_running_loop()

    def on_signal(sig: int) -> None:
        if server.should_exit:  # a second Ctrl-C: stop waiting for requests to wind down
            server.force_exit = True
        loop.call_soon_threadsafe(shutdown, f"received {signal.Signals(sig).name}")

    def shutdown(reason: str) -> None:
        api.stop_accepting(f"the server is shutting down ({reason})")
        server.should_exit = True

    server = _uvicorn_server(build_app(api), on_signal)
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.02)
    if server.started:
        print(ready_line(sock.getsockname()[1]), flush=True)
    while not serving.done():
        if api.engine.error is not None and died_at is None:
            print(f"pipesplit: error: {first_line(api.engine.error)}", file=sys.stderr, flush=True)
            exit_code = 1
            died_at = time.monotonic()
            api.engine_died()
        if died_at is not None and time.monotonic() - died_at >= api.limits.unhealthy_seconds:
            server.should_exit = True
        await asyncio.wait({serving}, timeout=0.05)
    serving.result()
    return exit_code


def _event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (the `server` extra), else asyncio's (None)."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def serve_command(args: argparse.Namespace) -> int:
    from pipesplit.generate import is_torchrun_worker, llm_kwargs

    if is_torchrun_worker():
        from pipesplit.runtime.stage import worker_main

        return worker_main(args.device)
    from pipesplit.runtime.engine import LLM, EngineDeadError, exit_after_engine_death

    limits = ServerLimits(args.max_request_bytes, args.max_prompt_tokens, args.unhealthy_seconds)
    sock = bind_socket(args.host, args.port)
    try:
        llm = LLM(args.model, **llm_kwargs(args))
    except BaseException as exc:
        sock.close()
        if isinstance(exc, EngineDeadError):
            print(f"pipesplit: error: {first_line(exc)}", file=sys.stderr)
            exit_after_engine_death(1)
        raise
    name = args.served_model_name or args.model
    api = OpenAIServer(llm, name, args.api_key, limits)
    host = f"[{args.host}]" if ":" in args.host else args.host

    def ready_line(port: int) -> str:
        return (f"pipesplit: serving {name} on http://{host}:{port} "
                f"(pp={len(llm.plan.stages)}, max_total_num_tokens={llm.max_total_num_tokens})")

    try:
        with asyncio.Runner(loop_factory=_event_loop_factory()) as runner:
            exit_code = runner.run(run_server(api, sock, ready_line))
    finally:
        llm.close()
    if llm.engine.error is not None:
        exit_after_engine_death(exit_code or 1)
    return exit_code
