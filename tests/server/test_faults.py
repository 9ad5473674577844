"""Faults under load on a real `pipesplit serve`: a stage SIGKILLed, a torchrun node gone.

The server must exit non-zero within 5 s (under torchrun: the rank-0 process; torchrun's agent
follows with the same failure), every open stream must end (an error event then
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


def wait_gone(pid: int, timeout: float) -> None:
    """Waits until `pid` (not a child of ours) has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                return
        except FileNotFoundError:
            return
        time.sleep(0.02)
    raise AssertionError(f"process {pid} still running {timeout:.0f} s after the fault")


def assert_fault_handled(server_pid: int, streams: Streams, health: list, killed_at: float) -> None:
    """The server process exited within EXIT_WITHIN; streams ended; /health gave 503 for the window."""
    wait_gone(server_pid, EXIT_WITHIN + 5)
    exited_after = time.monotonic() - killed_at
    streams.join(10)
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


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        for children in Path(f"/proc/{todo.pop()}/task").glob("*/children"):
            kids = [int(c) for c in children.read_text().split()]
            found += kids
            todo += kids
    return found


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
        while not any(status == 503 for _, status in health) and time.monotonic() - killed_at < EXIT_WITHIN:
            time.sleep(0.01)
        # inside the window a new request is refused, as /health says
        refused = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable", refused.text
        assert "stage 1" in refused.json()["error"]["message"]
        assert_fault_handled(server.pid, streams, health, killed_at)
        stop.set()
        assert server.wait(5) == 1
        assert f"stage 1 (pid {stage}) was killed by SIGKILL" in server.stderr.read()
    finally:
        server.kill()




def test_a_torchrun_node_dies_under_load(long_context_model):
    from tests.runtime.test_launch import _free_port

    torchrun = str(Path(sys.executable).with_name("torchrun"))
    port = str(_free_port())
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port,
              *serve_args(long_context_model)]
    nodes = [subprocess.Popen([torchrun, "--node-rank", str(rank), *common], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENV)
             for rank in (0, 1)]
    try:
        url = wait_ready(nodes[0])
        (server,) = descendants(nodes[0].pid)  # rank 0: the pipesplit server torchrun started
        streams = Streams(url)
        stop = threading.Event()
        health = watch_health(url, stop)
        # the whole node: its torchrun agent and its stage (torchrun gives the stage its own session)
        for pid in [*descendants(nodes[1].pid), nodes[1].pid]:
            os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        assert_fault_handled(server, streams, health, killed_at)
        stop.set()
        # torchrun's own agent takes a few more seconds to tear down; it reports rank 0's exit code
        assert nodes[0].wait(30) != 0
        errors = nodes[0].stderr.read()
        assert "closed its heartbeat connection" in errors and "exitcode: 1" in errors, errors[-2000:]
    finally:
        for node in nodes:
            for pid in [*descendants(node.pid), node.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
