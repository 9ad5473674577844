"""Faults under load on a real `pipesplit serve`: a stage SIGKILLed, a torchrun node gone.

The server must exit non-zero within 5 s, every open stream must end (an error event then
[DONE], or a closed connection; never a hang), and between the death and the exit /health must
answer 503 for the defined window (`--unhealthy-seconds`, default 2 s).

The model is the tiny random llama with a byte tokenizer (tests/server/conftest.py) and a
4,096-token context, so that streams of 3,000 tokens are still running when the fault comes.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from pipesplit.server.limits import UNHEALTHY_SECONDS  # noqa: E402

pytestmark = pytest.mark.slow

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
STREAMS = 6
EXIT_WITHIN = 5.0


def serve_args(model: Path) -> list[str]:
    return ["-m", "pipesplit", "serve", str(model), "--pp", "2", "--port", "0", "--mem-budget", "0.05",
            "--threads", "1", "--served-model-name", "tiny"]


def wait_ready(proc: subprocess.Popen, timeout: float = 180) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        found = re.search(r"pipesplit: serving \S+ on (http://\S+) ", line)
        if found:
            return found.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"the server did not start: {proc.stderr.read() if proc.stderr else ''}")


class Streams:
    """STREAMS long streaming completions in threads; records how each one ended."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.started = threading.Barrier(STREAMS + 1, timeout=120)
        self.endings: list[str] = []
        self.threads = [threading.Thread(target=self._one, args=(i,), daemon=True) for i in range(STREAMS)]
        for t in self.threads:
            t.start()
        self.started.wait()  # every stream has its first token

    def _one(self, i: int) -> None:
        body = {"model": "tiny", "prompt": f"stream {i}:", "max_tokens": 3000, "ignore_eos": True, "stream": True,
                "temperature": 0}
        events, first = [], True
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=body, timeout=30) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[len("data: "):])
                        if first:
                            first = False
                            self.started.wait()
        except httpx.TransportError:
            self.endings.append("closed")
            return
        if events and events[-1] == "[DONE]" and len(events) > 1 and '"error"' in events[-2]:
            self.endings.append("error event")
        elif not events or events[-1] != "[DONE]":
            self.endings.append("closed")
        else:
            self.endings.append(f"finished normally: {events[-2][:200]}")

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        assert not any(t.is_alive() for t in self.threads), "a stream hung after the fault"


def watch_health(url: str, stop: threading.Event) -> list[tuple[float, int | None]]:
    """(monotonic time, /health status or None when refused), every 20 ms, until `stop`."""
    seen: list[tuple[float, int | None]] = []

    def poll() -> None:
        with httpx.Client(timeout=1.0) as client:
            while not stop.is_set():
                try:
                    status = client.get(f"{url}/health").status_code
                except httpx.TransportError:
                    status = None
                seen.append((time.monotonic(), status))
                if status is None:
                    return
                time.sleep(0.02)

    threading.Thread(target=poll, daemon=True).start()
    return seen


def assert_fault_handled(server: subprocess.Popen, streams: Streams, health: list, killed_at: float) -> None:
    code = server.wait(EXIT_WITHIN + 5)
    exited_after = time.monotonic() - killed_at
    streams.join(10)
    assert code != 0
    assert exited_after < EXIT_WITHIN, f"the server exited {exited_after:.1f} s after the fault"
    assert set(streams.endings) <= {"closed", "error event"}, streams.endings
    assert len(streams.endings) == STREAMS
    unhealthy = [t for t, status in health if status == 503]
    assert unhealthy, f"/health never answered 503 before the exit: {health[-5:]}"
    assert all(status in (200, 503, None) for _, status in health)
    # the window: from the first 503 to the port closing, about UNHEALTHY_SECONDS
    closed = next((t for t, status in health if status is None), time.monotonic())
    window = closed - unhealthy[0]
    assert UNHEALTHY_SECONDS - 0.5 <= window <= UNHEALTHY_SECONDS + 1.5, f"503 window {window:.2f} s"


def stage_pids(pid: int) -> list[int]:
    pids = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        pids += [int(p) for p in children.read_text().split()]
    return [p for p in pids if b"pipesplit.runtime.stage" in Path(f"/proc/{p}/cmdline").read_bytes()]


def test_sigkill_of_a_stage_under_load(long_context_model):
    server = subprocess.Popen([sys.executable, *serve_args(long_context_model)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        url = wait_ready(server)
        streams = Streams(url)
        stop = threading.Event()
        health = watch_health(url, stop)
        (stage,) = stage_pids(server.pid)
        os.kill(stage, signal.SIGKILL)
        killed_at = time.monotonic()
        assert_fault_handled(server, streams, health, killed_at)
        stop.set()
        assert f"stage 1 (pid {stage}) was killed by SIGKILL" in server.stderr.read()
    finally:
        server.kill()


@pytest.mark.xfail(reason="without a process watcher (torchrun) rank 0 learns of a dead node only from gloo, "
                          "whose isend to the dead peer blocks: no detection yet", strict=True)
def test_a_torchrun_node_dies_under_load(long_context_model):
    from tests.runtime.test_launch import _free_port

    torchrun = str(Path(sys.executable).with_name("torchrun"))
    port = str(_free_port())
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port,
              *serve_args(long_context_model)]
    nodes = [subprocess.Popen([torchrun, "--node-rank", str(rank), *common], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True)
             for rank in (0, 1)]
    try:
        url = wait_ready(nodes[0])
        streams = Streams(url)
        stop = threading.Event()
        health = watch_health(url, stop)
        os.killpg(nodes[1].pid, signal.SIGKILL)  # the whole node: its torchrun agent and its stage
        killed_at = time.monotonic()
        assert_fault_handled(nodes[0], streams, health, killed_at)
        stop.set()
    finally:
        for node in nodes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
