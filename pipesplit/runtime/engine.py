"""The engine: rank 0's loop that schedules micro-batches through the pipeline, and `LLM`.

Hops from request to token: `LLM.submit` -> `Engine` inbox -> `Scheduler.schedule` (a
micro-batch) -> `Stage.forward` on rank 0 -> stage processes (`stage.worker_loop`) -> the last
stage's sampler -> token ids back to `Engine._complete` -> `RequestOutput` to the caller.
"""

from __future__ import annotations

import collections
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from pipesplit.errors import UserError
from pipesplit.planner.plan import DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_RUNNING_REQUESTS, Plan
from pipesplit.runtime.messages import RunConfig, StageReport, StepMessage, encode
from pipesplit.runtime.sampler import SamplingParams
from pipesplit.runtime.scheduler import Request, ScheduledBatch, Scheduler, SchedulerConfig

if TYPE_CHECKING:
    from torch.distributed import Store

    from pipesplit.planner.spec import ModelSpec
    from pipesplit.runtime.tokenizer import Tokenizer

HEARTBEAT_SECONDS = 30.0
WATCHER_GRACE_SECONDS = 3.0
HEARTBEAT_INTERVAL = 0.5  # torchrun stages -> rank 0
HEARTBEAT_TIMEOUT = 3.0


class EngineDeadError(RuntimeError):
    """A stage process died or failed; the engine cannot serve any more requests."""


def exit_after_engine_death(code: int) -> NoReturn:
    """Ends a command whose engine died, skipping interpreter teardown.

    After a stage death the engine or start-up thread may still sit in a gloo call on a dead
    peer and the process group cannot be destroyed; tearing the interpreter down around such a
    thread can end in std::terminate (exit 134 instead of `code`), and it costs seconds under load.
    Everything worth keeping (stage processes, output) is already handled when this is called.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@dataclass(frozen=True)
class RequestOutput:
    """A request's state after a step: everything generated so far plus what is new."""

    req_id: int
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    text: str
    delta_token_ids: tuple[int, ...]
    delta_text: str
    finished: bool
    finish_reason: str | None = None
    num_cached_tokens: int = 0  # prompt tokens read from the prefix cache instead of computed


@dataclass
class EngineStats:
    """What /metrics shows; written by the engine thread only."""

    generated_tokens: int = 0
    prompt_tokens: int = 0
    finished_requests: int = 0
    preemptions: int = 0
    prefix_cache_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hit_tokens: int = 0  # of those, found there
    stage_step_seconds: list[float] = field(default_factory=list)


@dataclass
class _InFlight:
    batch: ScheduledBatch
    sends: list
    started: float
    reply: Any = None  # the last stage's answer (sampled tokens, stage times), once asked for
    receiving: Any = None  # its irecv, which the reply waiter thread waits on
    arrived: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None  # what the receive raised


class IncrementalText:
    """A request's output text, decoded a few tokens at a time (decoding the whole output for
    every new token is quadratic in its length).

    Text is settled up to `read` tokens; each update decodes only the tokens after `prefix`
    (kept as left context so that tokenizers that drop or merge leading spaces decode the new
    tokens as they would inside the whole text) and settles the new part once it does not end
    in an incomplete UTF-8 character.
    """

    def __init__(self, detokenize: Callable[[list[int]], str]) -> None:
        self.detokenize = detokenize
        self.settled = ""
        self.prefix = self.read = 0
        self.prefix_text = ""

    def text(self, ids: list[int]) -> str:
        """The text of `ids` (the same list, grown since the last call); an unsettled tail may end in U+FFFD."""
        full = self.detokenize(ids[self.prefix :])
        tail = full[len(self.prefix_text) :]
        if tail and not tail.endswith("\ufffd"):
            self.settled += tail
            self.prefix, self.read = self.read, len(ids)
            self.prefix_text = self.detokenize(ids[self.prefix : self.read])
            return self.settled
        return self.settled + tail


@dataclass
class _Tracked:
    request: Request
    on_output: Callable[[RequestOutput], None]
    decoder: IncrementalText
    sent_text: str = ""
    sent_tokens: int = 0


# -- process launch ------------------------------------------------------------------------------
class SpawnedStages:
    """Stage processes 1..P-1 on this machine, watched: if one dies, `on_death` is called."""

    def __init__(self, world_size: int, device: str, threads_per_stage: int) -> None:
        import torch.distributed as dist

        # The rendezvous store listens on a port the OS picks (port 0): nothing can take the port
        # between choosing and binding it, as with picking a free port and closing it again.
        self.store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
        self.port = self.store.port
        self.closing = False
        env = dict(os.environ)
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(self.port), WORLD_SIZE=str(world_size), PIPESPLIT_SPAWNED="1")
        if world_size * threads_per_stage > (os.cpu_count() or 1):
            # More threads than cores: an idle OpenMP thread must sleep at once, not spin on a core
            # another stage needs. Otherwise OpenMP's default (spin briefly, then sleep) is kept:
            # sleeping at once made every small GEMM wait for its threads to wake (PP1 bfloat16
            # here: 179 tok/s with PASSIVE, 253 without).
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.procs = {
            rank: subprocess.Popen(
                [sys.executable, "-m", "pipesplit.runtime.stage", device],
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                stdin=subprocess.DEVNULL,
            )
            for rank in range(1, world_size)
        }

    def watch(self, on_death: Callable[[str], None]) -> None:
        """Starts watching: the first stage that exits unasked is reported to `on_death`."""
        self._on_death = on_death
        self._unwatch = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True, name="stage-watch")
        self._watcher.start()

    def stop_watching(self) -> None:
        """Ends the watcher thread and waits for it.

        No thread of ours may outlive `LLM.close()`: a daemon thread still running at interpreter
        exit holds the last references to the engine (its `on_death` is `Engine.fail`), frees the
        engine's tensors while the interpreter finalizes, and is killed by Python inside torch's
        tensor deallocation: std::terminate, exit 134 ("terminate called without an active exception").
        """
        watcher = getattr(self, "_watcher", None)
        if watcher is not None:
            self._unwatch.set()
            if watcher is not threading.current_thread():
                watcher.join()
        self._on_death = None


    def _watch(self) -> None:
        while not self._unwatch.is_set():
            for rank, proc in self.procs.items():
                code = proc.poll()
                if code is None or (self.closing and code == 0):
                    continue
                if self.closing:
                    return
                self.kill()
                on_death = self._on_death
                if on_death is not None:
                    on_death(f"stage {rank} (pid {proc.pid}) {_describe_exit(code)}")
                return
            if self.closing and all(p.poll() is not None for p in self.procs.values()):
                return
            self._unwatch.wait(0.1)

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()


class RemoteStages:
    """Stages started by torchrun, possibly on other machines, watched through heartbeats.

    Rank 0 cannot poll another node's processes, and gloo does not notice a dead peer reliably
    (an isend to it can block for good). Every stage connects to this port once it has started
    and sends a byte every HEARTBEAT_INTERVAL; a connection that closes (the process died: the
    kernel closes it) or stays silent for HEARTBEAT_TIMEOUT (the node is gone) is reported to
    `on_death`, like a spawned stage that exits.
    """

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.closing = False
        self._listener = socket.create_server(("", 0), family=socket.AF_INET, backlog=world_size)
        self.port = self._listener.getsockname()[1]
        self._unwatch = threading.Event()
        self._watcher: threading.Thread | None = None
        self._on_death: Callable[[str], None] | None = None

    def watch(self, on_death: Callable[[str], None]) -> None:
        self._on_death = on_death
        self._watcher = threading.Thread(target=self._watch, daemon=True, name="stage-heartbeats")
        self._watcher.start()

    def stop_watching(self) -> None:
        """Ends the watcher thread and waits for it (see SpawnedStages.stop_watching)."""
        self._unwatch.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join()
        self._on_death = None
        self._listener.close()

    def _report(self, why: str) -> None:
        on_death = self._on_death
        if on_death is not None and not self.closing and not self._unwatch.is_set():
            on_death(why)

    def _watch(self) -> None:
        import selectors

        peers: dict[socket.socket, tuple[int | None, str, float]] = {}  # -> (rank, address, last heard)
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            while not self._unwatch.is_set():
                now = time.monotonic()
                for conn, (rank, address, heard) in list(peers.items()):
                    if rank is not None and now - heard > HEARTBEAT_TIMEOUT:
                        self._report(f"stage {rank} ({address}) sent no heartbeat for {HEARTBEAT_TIMEOUT:g} s: "
                                     "its node is unreachable")
                        return
                for key, _ in selector.select(timeout=0.1):
                    if key.fileobj is self._listener:
                        conn, (host, port) = self._listener.accept()
                        peers[conn] = (None, f"{host}:{port}", time.monotonic())
                        selector.register(conn, selectors.EVENT_READ)
                        continue
                    conn = key.fileobj
                    rank, address, _ = peers[conn]
                    try:
                        data = conn.recv(64)
                    except OSError:
                        data = b""
                    if not data:
                        if self.closing:
                            selector.unregister(conn)
                            conn.close()
                            del peers[conn]
                            continue
                        self._report(f"stage {rank if rank is not None else '?'} ({address}) closed its heartbeat "
                                     "connection: the process or its node is gone")
                        return
                    if rank is None:
                        rank = data[0]  # the first byte a stage sends is its rank
                    peers[conn] = (rank, address, time.monotonic())
            for conn in peers:
                conn.close()


def send_heartbeats(address: str, port: int, rank: int) -> threading.Event:
    """A stage under torchrun: heartbeats to rank 0 (see RemoteStages) until the returned event
    is set (the stage got its shutdown). If rank 0 goes away without a shutdown, the process exits."""
    conn = socket.create_connection((address, port), timeout=30)
    conn.settimeout(HEARTBEAT_TIMEOUT)
    done = threading.Event()

    def beat() -> None:
        try:
            conn.sendall(bytes([rank]))
            while not done.wait(HEARTBEAT_INTERVAL):
                conn.sendall(b".")
        except OSError:
            # rank 0 closes these connections when it stops, just after sending the shutdown
            if not done.wait(HEARTBEAT_TIMEOUT):
                print(f"pipesplit: stage {rank} stopped: rank 0 is gone", file=sys.stderr, flush=True)
                os._exit(1)  # the main thread may be blocked in a recv from rank 0 for good
        finally:
            conn.close()

    threading.Thread(target=beat, daemon=True, name="heartbeat").start()
    return done


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


# -- the engine ------------------------------------------------------------------------------------
class Engine:
    """Rank 0: owns stage 0, the scheduler and the micro-batches in flight."""

    def __init__(
        self,
        config: RunConfig,
        scheduler_config: SchedulerConfig,
        *,
        eos_token_ids: frozenset[int],
        detokenize: Callable[[list[int]], str],
        store: "Store | None",
        watched: bool = False,
    ) -> None:
        self.config = config
        self.eos_token_ids = eos_token_ids
        self.detokenize = detokenize
        self.scheduler_config = scheduler_config
        self.num_stages = len(config.plan.stages)
        self.error: BaseException | None = None
        self.stats = EngineStats(stage_step_seconds=[0.0] * self.num_stages)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._tracked: dict[int, _Tracked] = {}
        self._next_id = 0
        self._id_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._store = store  # rank 0's rendezvous store; None: from the torchrun environment
        self.watched = watched  # a SpawnedStages watcher reports stage deaths (names the stage)
        # called in the engine thread with each completed step and every stage's compute seconds
        # for it (forward, and sampling on the last); `pipesplit profile` calibrates against these
        self.on_step: Callable[[ScheduledBatch, list[float]], None] | None = None

    # start-up runs in the caller's thread so that load errors surface there
    def start(self) -> None:
        import torch

        from pipesplit.runtime.kv_cache import SlotAllocator, WindowSlots
        from pipesplit.runtime.prefix_cache import PrefixCache
        from pipesplit.runtime.stage import start_stage

        self._torch = torch
        self.stage, capacity, self.reports, self.link = start_stage(
            encode(self.config), self.config.device, store=self._store, world=self.num_stages
        )
        self.capacity, self.window_slots = capacity.max_total_num_tokens, capacity.window_slots
        self.allocator = SlotAllocator(self.capacity)
        windows = WindowSlots(self.stage.spec.sliding_window, self.window_slots) if self.window_slots else None
        # A window pool keeps no K/V of a prefix's last window positions once they slide out, so a
        # cached prefix could not be resumed: prefix caching is off for models with one.
        self.prefix_caching = self.scheduler_config.prefix_caching and windows is None
        cache = PrefixCache() if self.prefix_caching else None
        self.scheduler = Scheduler(self.scheduler_config, self.allocator, cache, windows)
        self.max_context = min(self.stage.spec.max_position_embeddings, self.capacity)
        self._inflight: collections.deque[_InFlight] = collections.deque()
        self._replies_awaited: queue.SimpleQueue = queue.SimpleQueue()
        self._reply_waiter = None
        if self.num_stages > 1:
            self._reply_waiter = threading.Thread(target=self._await_replies, daemon=True, name="pipesplit-replies")
            self._reply_waiter.start()
        self._thread = threading.Thread(target=self._run, daemon=True, name="pipesplit-engine")
        self._thread.start()

    # -- called from any thread ----------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, on_output: Callable[[RequestOutput], None]) -> int:
        self.raise_if_dead()
        prompt_ids = check_prompt_ids(self.stage.spec, prompt_ids, self.capacity)
        with self._id_lock:
            req_id = self._next_id
            self._next_id += 1
        seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
        request = Request(req_id, prompt_ids, params, seed, self.max_context)
        self._inbox.put(("add", _Tracked(request, on_output, IncrementalText(self.detokenize))))
        self._wake.set()
        return req_id

    def abort(self, req_id: int) -> None:
        self._inbox.put(("abort", req_id))
        self._wake.set()

    def raise_if_dead(self) -> None:
        if self.error is not None:
            raise EngineDeadError(str(self.error)) from self.error

    def fail(self, reason: str) -> None:
        """Called by the stage watcher: a stage is gone."""
        if self.error is None:
            self.error = EngineDeadError(reason)
        self._stopping.set()
        self._wake.set()
        self._fail_all(reason)

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._reply_waiter is not None and (self._thread is None or not self._thread.is_alive()):
            self._reply_waiter.join(timeout)  # it ends once the engine thread has ended

    def usage(self) -> dict[str, int]:
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            # As SGLang counts them: cached tokens no request reads are free (evictable on demand).
            "kv_tokens_used": self.allocator.num_used - self.scheduler.evictable_tokens,
            "kv_tokens_free": self.allocator.num_free + self.scheduler.evictable_tokens,
            "kv_tokens_cached": self.scheduler.cached_tokens,
        }

    # -- the engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        last_sent = time.monotonic()
        try:
            while not self._stopping.is_set():
                self._drain_inbox()
                batch = self.scheduler.schedule() if len(self._inflight) < self.scheduler_config.micro_batches else None
                if batch is not None:
                    self._launch(batch)
                    last_sent = time.monotonic()
                elif self._inflight:
                    self._complete_oldest(responsive=len(self._inflight) < self.scheduler_config.micro_batches)
                elif time.monotonic() - last_sent > HEARTBEAT_SECONDS or self.scheduler.pending_release():
                    # Idle stages wait in recv, which times out: keep them fed, and pass releases on.
                    self._send_release()
                    last_sent = time.monotonic()
                else:
                    self._wake.wait(0.05)
                    self._wake.clear()
            self._shutdown()
        except BaseException as exc:  # noqa: BLE001 -- every waiter must hear about it
            # A dead peer shows here first as a transport error; the stage watcher names the
            # stage and the cause a moment later, which is what the user needs to read.
            deadline = time.monotonic() + (WATCHER_GRACE_SECONDS if self.watched else 0)
            while self.error is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if self.error is None:
                self.error = exc
            self._fail_all(f"{type(exc).__name__}: {exc}")
        finally:
            self._replies_awaited.put(None)  # the reply waiter thread ends

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self._tracked[item.request.req_id] = item
                self.scheduler.add(item.request)
                self.stats.prompt_tokens += len(item.request.prompt_ids)
            elif kind == "abort":
                tracked = self._tracked.get(item)
                if tracked is None:
                    continue
                if tracked.request.in_flight:
                    tracked.request.abort_requested = True
                else:
                    self._finish(tracked, "abort")

    def _launch(self, batch: ScheduledBatch) -> None:
        torch = self._torch
        message = batch.message
        ids = []
        for request, seq in zip(batch.requests, message.seqs):
            n = len(seq.new_slots)
            ids.extend(request.all_ids[request.num_computed - n : request.num_computed])
        inputs = torch.tensor(ids, dtype=torch.long, device=self.stage.device)
        started = time.perf_counter()
        out = self.stage.forward(message, inputs)
        elapsed = time.perf_counter() - started
        if self.num_stages == 1:
            tokens = self.stage.sample(message, out).tolist() if message.num_samples else []
            if self.on_step is not None:
                self.on_step(batch, [time.perf_counter() - started])
            self._record_step_times([elapsed])
            self._complete(batch, tokens)
            return
        timings = torch.zeros(self.num_stages, dtype=torch.float64)
        timings[0] = elapsed
        sends = self.link.send_step(message, out, timings, 1)
        self._inflight.append(_InFlight(batch, sends, started))

    def _complete_oldest(self, responsive: bool = False) -> None:
        """Takes the oldest step's answer from the last stage and completes it. `responsive`: returns
        early, the step still in flight, if a request or an abort arrives first (a micro-batch slot
        is free: its prefill can start on stage 0 now rather than after the answer)."""
        flight = self._inflight[0]
        n = flight.batch.message.num_samples
        if flight.receiving is None:
            torch = self._torch
            flight.reply = torch.empty(n + self.num_stages, dtype=torch.float64, device=self.link.device)
            flight.receiving = torch.distributed.irecv(flight.reply, self.num_stages - 1)
            self._replies_awaited.put(flight)
        if responsive and not flight.arrived.is_set():
            self._wake.wait()
            self._wake.clear()
            if not flight.arrived.is_set():
                return
        flight.arrived.wait()
        if flight.error is not None:
            raise flight.error
        self._inflight.popleft()
        for work, _ in flight.sends:
            work.wait()
        reply = flight.reply.cpu()
        self._record_step_times(reply[n:].tolist())
        if self.on_step is not None:
            self.on_step(flight.batch, reply[n:].tolist())
        self._complete(flight.batch, [int(t) for t in reply[:n].tolist()])

    def _await_replies(self) -> None:
        """The reply waiter thread: waits in each posted receive (a gloo receive cannot be polled)
        and wakes the engine thread when it completes."""
        while (flight := self._replies_awaited.get()) is not None:
            try:
                flight.receiving.wait()
            except BaseException as exc:  # noqa: BLE001 -- raised again in the engine thread
                flight.error = exc
            flight.arrived.set()
            self._wake.set()

    def _record_step_times(self, seconds: list[float]) -> None:
        # An exponential moving average keeps /metrics readable under bursty load.
        for i, s in enumerate(seconds):
            old = self.stats.stage_step_seconds[i]
            self.stats.stage_step_seconds[i] = s if old == 0 else 0.8 * old + 0.2 * s

    def _complete(self, batch: ScheduledBatch, tokens: list[int]) -> None:
        for request, token in self.scheduler.complete(batch, tokens):
            tracked = self._tracked[request.req_id]
            if request.abort_requested:
                self._finish(tracked, "abort")
                continue
            if token is None:
                continue
            request.output_ids.append(token)
            self.stats.generated_tokens += 1
            reason = self._stop_reason(request, token)
            if reason is None:
                self._emit(tracked)
            else:
                self._finish(tracked, reason)
        self.stats.preemptions = self.scheduler.num_preemptions
        self.stats.prefix_cache_queried_tokens = self.scheduler.cache_stats.queried_tokens
        self.stats.prefix_cache_hit_tokens = self.scheduler.cache_stats.hit_tokens

    def _stop_reason(self, request: Request, token: int) -> str | None:
        params = request.params
        if not params.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if token in params.stop_token_ids:
            return "stop"
        if params.stop and self._find_stop(self._tracked[request.req_id]) is not None:
            return "stop"
        if len(request.output_ids) >= params.max_tokens or request.num_tokens >= request.max_context:
            return "length"
        return None

    def _text(self, tracked: _Tracked) -> str:
        return tracked.decoder.text(tracked.request.output_ids)

    def _find_stop(self, tracked: _Tracked) -> int | None:
        text = self._text(tracked)
        hits = [i for i in (text.find(s) for s in tracked.request.params.stop) if i >= 0]
        return min(hits) if hits else None

    def _emit(self, tracked: _Tracked, final_reason: str | None = None) -> None:
        request = tracked.request
        text = self._text(tracked)
        if final_reason is None:
            # Hold back an incomplete UTF-8 character and a possible start of a stop string.
            text = text.rstrip("\ufffd")
            for stop in request.params.stop:
                for k in range(min(len(stop) - 1, len(text)), 0, -1):
                    if text.endswith(stop[:k]):
                        text = text[:-k]
                        break
        else:
            cut = self._find_stop(tracked) if request.params.stop else None
            if cut is not None:
                text = text[:cut]
        if not text.startswith(tracked.sent_text):
            text = tracked.sent_text  # never take back what was already streamed
        delta_tokens = tuple(request.output_ids[tracked.sent_tokens :])
        output = RequestOutput(
            req_id=request.req_id,
            prompt_token_ids=tuple(request.prompt_ids),
            token_ids=tuple(request.output_ids),
            text=text,
            delta_token_ids=delta_tokens,
            delta_text=text[len(tracked.sent_text) :],
            finished=final_reason is not None,
            finish_reason=final_reason,
            num_cached_tokens=request.num_cached_tokens or 0,
        )
        tracked.sent_text, tracked.sent_tokens = text, len(request.output_ids)
        tracked.on_output(output)

    def _finish(self, tracked: _Tracked, reason: str) -> None:
        self.scheduler.finish(tracked.request, reason)
        self.stats.finished_requests += 1
        self._tracked.pop(tracked.request.req_id, None)
        self._emit(tracked, reason)

    def _fail_all(self, reason: str) -> None:
        for tracked in list(self._tracked.values()):
            try:
                self._emit(tracked, "abort")
            except Exception:  # noqa: BLE001 -- a broken callback must not hide the failure
                pass
        self._tracked.clear()

    def _shutdown(self) -> None:
        while self._inflight:
            self._complete_oldest()
        for tracked in list(self._tracked.values()):
            if not tracked.request.in_flight:
                self._finish(tracked, "abort")
        if self.num_stages > 1 and self.error is None:
            self._send_release(shutdown=True)

    def _send_release(self, shutdown: bool = False) -> None:
        """A step with no sequences: passes pending releases (or the shutdown order) down the pipeline."""
        message = self.scheduler.release_message()
        if shutdown:
            message = StepMessage(step_id=message.step_id, shutdown=True)
        self.stage.apply(message)
        if self.num_stages == 1:
            return
        timings = self._torch.zeros(self.num_stages, dtype=self._torch.float64)
        for work, _ in self.link.send_step(message, None, timings, 1):
            work.wait()


def check_prompt_ids(spec: "ModelSpec", prompt_ids: Sequence[int], capacity: int | None = None) -> list[int]:
    """The prompt as ints, refused if empty, outside the vocabulary or without room for one new token
    (in the context, and in the KV pool once its `capacity` is known)."""
    prompt_ids = [int(t) for t in prompt_ids]
    if not prompt_ids:
        raise UserError("the prompt is empty; give at least one token")
    bad = [t for t in prompt_ids if not 0 <= t < spec.vocab_size]
    if bad:
        raise UserError(f"token id {bad[0]} is outside the vocabulary (0..{spec.vocab_size - 1})")
    max_context = min(spec.max_position_embeddings, capacity or spec.max_position_embeddings)
    if len(prompt_ids) >= max_context:
        kv = f", KV capacity {capacity} tokens" if capacity else ""
        raise UserError(
            f"the prompt has {len(prompt_ids)} tokens but at most {max_context - 1} fit "
            f"(context length {spec.max_position_embeddings}{kv}); shorten the prompt"
        )
    return prompt_ids


# -- the user-facing API ------------------------------------------------------------------------------
def encode_prompt(tokenizer: "Tokenizer | None", model_name: str, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
    """Token ids of a text prompt (through the chat template with `chat`); token ids pass through."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise UserError(f"{model_name} has no tokenizer files; give token ids (--prompt-ids 1,2,3) instead of text")
        if chat:
            return tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        return tokenizer.encode(prompt)
    return [int(t) for t in prompt]


# ------------------------------------------------------------------------------
class LLM:
    """A pipeline-parallel model: `with LLM("smollm2", pp=2) as llm: llm.generate(prompts, params)`.

    Spawns the stage processes on this machine, or, when started by torchrun (RANK and
    WORLD_SIZE set, this being rank 0), joins the stages torchrun started on every node.
    """

    def __init__(
        self,
        model: str = "smollm2",
        pp: int = 1,
        *,
        strategy: str | None = None,
        partition: str | Sequence[int] | None = None,
        dtype: str = "auto",
        device: str = "cpu",
        mem_budget_gib: float | None = None,
        mem_fraction: float = 0.9,
        micro_batches: int | None = None,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        max_running_requests: int = DEFAULT_MAX_RUNNING_REQUESTS,
        chunked_prefill_size: int = 512,
        threads: int | None = None,
        mtp: bool = False,
        enable_prefix_caching: bool = True,
        log: bool = True,
        progress: bool | None = None,
    ) -> None:
        from pipesplit.planner.plan import window_pool_for
        from pipesplit.runtime.dtype import choose_dtype
        from pipesplit.runtime.loader import resolve_model
        from pipesplit.runtime.plan_bridge import budgets_for, check_fits, packs_tied_head, runtime_plan
        from pipesplit.runtime.tokenizer import load_tokenizer_or_none

        if dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UserError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
        if device not in ("cpu", "cuda"):
            raise UserError(f"unknown device {device!r}; use cpu or cuda")
        torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ and "PIPESPLIT_SPAWNED" not in os.environ
        if torchrun:
            if int(os.environ["RANK"]) != 0:
                raise RuntimeError("LLM is built on rank 0 only; other ranks run pipesplit.runtime.stage.worker_main")
            world = int(os.environ["WORLD_SIZE"])
            if world != pp:
                raise UserError(f"torchrun started {world} processes but --pp is {pp}; make them equal")
        self.source = resolve_model(model)
        self.spec = self.source.spec
        self.dtype_choice = choose_dtype(dtype, device, self.spec.torch_dtype)
        dtype = self.dtype = self.dtype_choice.dtype
        self.tokenizer = load_tokenizer_or_none(self.source)
        scheduler_config = SchedulerConfig(
            micro_batches=micro_batches or pp,
            max_batch_tokens=max_batch_tokens,
            max_running_requests=max_running_requests,
            chunked_prefill_size=chunked_prefill_size,
            prefix_caching=enable_prefix_caching,
        )
        window_pool = window_pool_for(self.spec, max_running_requests, max_batch_tokens, scheduler_config.micro_batches)
        budgets = budgets_for(self.spec, pp, device, mem_budget_gib, mem_fraction)
        packed_tied_head = packs_tied_head(self.spec, device, dtype)
        self.plan: Plan = runtime_plan(self.spec, pp, strategy, partition, dtype, budgets, mtp, window_pool,
                                       packed_tied_head)
        check_fits(self.plan, device)
        cpu_threads = threads or max(1, (os.cpu_count() or 1) // pp)
        # progress bars only where a person watches: logging on and stderr a terminal (each stage checks its own)
        progress = log and sys.stderr.isatty() if progress is None else progress
        self._closed = True
        self._remote = RemoteStages(pp) if torchrun and pp > 1 else None
        heartbeat_port = self._remote.port if self._remote is not None else 0
        config = RunConfig(model, self.plan, dtype, device, budgets, mem_fraction, cpu_threads, mtp,
                           window_pool=window_pool, progress=progress, heartbeat_port=heartbeat_port,
                           max_step_tokens=max_batch_tokens,
                           max_step_samples=min(max_running_requests, max_batch_tokens),
                           packed_tied_head=packed_tied_head)
        self._spawned = SpawnedStages(pp, device, cpu_threads) if not torchrun and pp > 1 else None
        if self._spawned is not None:
            store = self._spawned.store
        else:
            import torch.distributed as dist

            store = None if torchrun else dist.HashStore()  # one process: no port at all
        self.engine = Engine(
            config,
            scheduler_config,
            eos_token_ids=frozenset(self.tokenizer.eos_token_ids if self.tokenizer else self.spec.eos_token_ids),
            detokenize=self.tokenizer.decode if self.tokenizer else (lambda ids: ""),
            store=store,
            watched=self._watchers() != [],
        )
        for watcher in self._watchers():
            watcher.watch(self.engine.fail)
        self._start_engine()
        self._closed = False
        if log:
            print(self.startup_report(), file=sys.stderr, flush=True)

    def _start_engine(self) -> None:
        """Starts rank 0's stage; a stage process that dies meanwhile ends the wait at once.

        The start runs in a helper thread because joining the process group or a collective
        blocks in C++ until every rank arrives, and a rank that died never will.
        """
        failure: list[BaseException] = []

        def start() -> None:
            try:
                self.engine.start()
            except BaseException as exc:  # noqa: BLE001 -- re-raised in the caller's thread
                failure.append(exc)

        starter = threading.Thread(target=start, daemon=True, name="pipesplit-start")
        starter.start()
        while starter.is_alive() and self.engine.error is None:
            starter.join(0.1)
        if self.engine.error is not None or failure:
            self._kill()
            if self.engine.error is not None:
                raise EngineDeadError(str(self.engine.error)) from None
            raise failure[0]

    # -- info ---------------------------------------------------------------------------------------
    @property
    def max_total_num_tokens(self) -> int:
        return self.engine.capacity

    @property
    def stage_reports(self) -> list[StageReport]:
        return self.engine.reports

    def startup_report(self) -> str:
        """Each stage's own capacity, the binding stage and the agreed capacity."""
        from pipesplit.runtime import kernels as cpu_kernels

        binding = min(self.stage_reports, key=lambda r: r.kv_tokens)
        lines = [
            f"pipesplit: {self.spec.name} on {len(self.stage_reports)} stage(s), partition "
            f"{','.join(map(str, self.plan.partition))}: max_total_num_tokens {self.max_total_num_tokens} "
            f"(binding stage {binding.stage}), dtype {self.dtype} ({self.dtype_choice.reason}), "
            f"prefix cache {'on' if self.engine.prefix_caching else 'off'}"
            + (f", decode attention: {cpu_kernels.status().detail}" if self.engine.stage.device.type == "cpu" else "")
            + (f", {self.engine.stage.tuning}" if self.engine.stage.tuning else "")
        ]
        if self.engine.window_slots:
            lines.append(
                f"pipesplit:   sliding-window layers (window {self.spec.sliding_window}) keep their K/V in a pool of "
                f"{self.engine.window_slots} slots, released as the windows slide"
                + ("; prefix caching is off for them (the pool keeps no prefix's window)"
                   if self.engine.scheduler_config.prefix_caching else "")
            )
        for plan_stage, r in zip(self.plan.stages, self.stage_reports):
            start, end = plan_stage.layers
            lines.append(
                f"pipesplit:   stage {r.stage}: layers {start}-{end - 1}, weights {r.param_bytes / 2**20:.1f} MiB, "
                f"budget {r.budget_bytes / 2**20:.1f} MiB, own capacity {r.kv_tokens} tokens"
            )
        return "\n".join(lines)

    # -- requests -----------------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
        return encode_prompt(self.tokenizer, self.spec.name, prompt, chat)

    def stream(self, prompt: str | Sequence[int], params: SamplingParams | None = None, *, chat: bool = False) -> Iterator[RequestOutput]:
        """Yields a RequestOutput per new token; the last one has finished=True."""
        outputs: queue.SimpleQueue = queue.SimpleQueue()
        req_id = self.engine.submit(self.encode_prompt(prompt, chat), params or SamplingParams(), outputs.put)
        try:
            while True:
                try:
                    output = outputs.get(timeout=0.5)
                except queue.Empty:
                    self.engine.raise_if_dead()
                    continue
                yield output
                if output.finished:
                    self.engine.raise_if_dead()
                    return
        finally:
            self.engine.abort(req_id)  # no-op if it finished; frees its slots if the caller left early

    def generate(
        self,
        prompts: str | Sequence[int] | Sequence[str | Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        chat: bool = False,
    ) -> list[RequestOutput]:
        """Runs all prompts concurrently and returns their final outputs, in order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise UserError(f"{len(prompts)} prompts but {len(params)} SamplingParams; give one or one per prompt")
        encoded = [self.encode_prompt(p, chat) for p in prompts]
        done = threading.Event()
        finals: dict[int, RequestOutput] = {}
        lock = threading.Lock()

        def collect(output: RequestOutput) -> None:
            if output.finished:
                with lock:
                    finals[output.req_id] = output
                    if len(finals) == len(encoded):
                        done.set()

        ids = [self.engine.submit(ids, p, collect) for ids, p in zip(encoded, params)]
        while not done.wait(0.2):
            self.engine.raise_if_dead()
        self.engine.raise_if_dead()
        return [finals[i] for i in ids]

    # -- lifecycle ----------------------------------------------------------------------------------
    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for watcher in self._watchers():
            watcher.closing = True
        # After a failure the engine thread may sit in a recv from a dead peer: do not wait long.
        self.engine.stop(timeout=2.0 if self.engine.error is not None else 30.0)
        if self._spawned is not None:
            if self.engine.error is not None:
                self._spawned.kill()
            self._spawned.wait(timeout=10)
        for watcher in self._watchers():
            watcher.stop_watching()
        import torch.distributed as dist

        if self.engine.error is None and dist.is_initialized():
            dist.destroy_process_group()

    def _watchers(self) -> list:
        """What reports a stage death: the spawned processes, or torchrun stages' heartbeats."""
        return [w for w in (self._spawned, self._remote) if w is not None]

    def _kill(self) -> None:
        for watcher in self._watchers():
            watcher.closing = True
            watcher.stop_watching()
        if self._spawned is not None:
            self._spawned.kill()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass
