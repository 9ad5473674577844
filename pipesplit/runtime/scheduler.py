"""The scheduler (rank 0): which requests run in the next micro-batch, and their KV slots.

Continuous batching: requests join and leave between steps. Each step takes running requests
that are not already in flight (a request's next token depends on its previous one), then admits
waiting ones while the token budget, the request limit and free KV slots allow. A long prompt is
prefilled in chunks. With M micro-batches in flight, one batch takes at most 1/M of the live
requests, so the pipeline's stages each have a different micro-batch to work on.

With the prefix cache (`prefix_cache.PrefixCache`, on by default), a request admitted with a
cached prefix reads those slots and computes only the rest (always at least its last token, whose
logits are sampled); every completed step's tokens are cached. A request's context slots are then
the cached ones it locked plus the ones it owns; it frees only what it owns.

When a running request needs slots and the pool is full, unreferenced cached tokens are evicted
first (least recently used), then the youngest running request that is not in flight is
preempted: its own slots go back to the pool and it waits to be recomputed from its prompt plus
what it has generated (mostly from the cache, when its tokens are still there). Nothing is
over-committed and no request is lost.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

from pipesplit.planner.plan import DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_RUNNING_REQUESTS
from pipesplit.runtime.kv_cache import SlotAllocator, WindowSlots
from pipesplit.runtime.messages import NewRequest, SeqStep, StepMessage
from pipesplit.runtime.prefix_cache import Node, PrefixCache
from pipesplit.runtime.sampler import SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    req_id: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    max_context: int
    output_ids: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)  # its context's slots, in order
    owned: set[int] = field(default_factory=set)  # those it must free (the rest belong to the cache)
    cache_node: Node | None = None  # the deepest cache node it reads (locked)
    cache_depth: int = 0  # tokens on the path to cache_node
    num_cached_tokens: int | None = None  # prompt tokens found in the cache at its first admission
    unsent_prefix: tuple[int, ...] = ()  # cached slots the stages have not been told of yet
    window_slots: list[int] = field(default_factory=list)  # sliding-window pool: positions window_first...
    window_first: int = 0
    num_computed: int = 0
    status: Status = Status.WAITING
    in_flight: bool = False
    announced: bool = False
    abort_requested: bool = False
    finish_reason: str | None = None
    num_preemptions: int = 0

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


# Uncached prompt tokens a waiting request must share with a prefill under way to wait for it
# (SGLang's in-batch prefix-caching threshold is also 32).
PENDING_PREFIX_TOKENS = 32


@dataclass(frozen=True)
class SchedulerConfig:
    micro_batches: int = 1
    max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS
    max_running_requests: int = DEFAULT_MAX_RUNNING_REQUESTS
    chunked_prefill_size: int = 512
    prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("micro_batches", "max_batch_tokens", "max_running_requests", "chunked_prefill_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class ScheduledBatch:
    message: StepMessage
    requests: list[Request]


@dataclass
class CacheStats:
    """Prompt tokens looked up in the prefix cache at first admission, and how many were found."""

    queried_tokens: int = 0
    hit_tokens: int = 0


class Scheduler:
    """allocator: the token pool; cache: the prefix cache (None: off); windows: the sliding-window
    layers' pool, if the model has some (the engine never combines it with a prefix cache)."""

    def __init__(
        self,
        config: SchedulerConfig,
        allocator: SlotAllocator,
        cache: PrefixCache | None = None,
        windows: WindowSlots | None = None,
    ) -> None:
        if cache is not None and windows is not None:
            raise ValueError("a prefix cache cannot resume windowed layers: give a cache or windows, not both")
        self.config = config
        self.allocator = allocator
        self.cache = cache
        self.cache_stats = CacheStats()
        self.windows = windows
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._step_id = 0
        self._preempted: list[int] = []
        self._finished: list[int] = []
        self.num_preemptions = 0

    # -- bookkeeping -------------------------------------------------------------------------
    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def finish(self, request: Request, reason: str) -> None:
        """Ends a request that is not in flight and returns its slots."""
        assert not request.in_flight, "a request in flight finishes when its step completes"
        if request.status is Status.FINISHED:
            return
        if request in self.running:
            self.running.remove(request)
        if request in self.waiting:
            self.waiting.remove(request)
        self._release(request)
        request.status = Status.FINISHED
        request.finish_reason = reason
        if request.announced:
            self._finished.append(request.req_id)

    def pending_release(self) -> bool:
        return bool(self._preempted or self._finished)

    # -- one micro-batch -------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        """The next micro-batch, or None if no request can make progress right now."""
        cfg = self.config
        limit = max(1, math.ceil(self.num_unfinished / cfg.micro_batches))
        budget = cfg.max_batch_tokens
        chosen: list[tuple[Request, list[int]]] = []

        for request in sorted(self.running, key=lambda r: r.req_id):
            if len(chosen) >= limit or budget <= 0:
                break
            if request.in_flight or request.status is not Status.RUNNING:
                continue  # in flight already, or preempted a moment ago to make room
            n = min(request.num_tokens - request.num_computed, cfg.chunked_prefill_size, budget)
            if not self._make_room(n, keep={request, *(r for r, _ in chosen)}):
                continue
            chosen.append((request, self._allocate(request, n)))
            budget -= n

        # Requests whose prompt is still being computed (the chosen ones included: they count
        # their new tokens only when the batch is built); each admitted request joins them.
        prefilling = [r for r in self.running if r.in_flight or r.num_computed < len(r.prompt_ids)]
        for request in list(self.waiting):
            if request.req_id in self._preempted:
                continue  # just gave its slots up; readmitting it now would only thrash
            if len(chosen) >= limit or budget <= 0 or len(self.running) >= cfg.max_running_requests:
                break
            cached = self._lock_cached_prefix(request)
            if self._shares_pending_prefix(request, cached, prefilling):
                # Another request is computing the same prefix right now: admitted later, this one
                # reads it from the cache instead of computing it a second time.
                self._release(request)
                request.num_computed = 0
                continue
            n = min(request.num_tokens - cached, cfg.chunked_prefill_size, budget)
            if n > self._num_free + self.evictable_tokens:
                self._release(request)
                request.num_computed = 0
                break  # first come, first served: later arrivals do not overtake
            self._evict(n)
            if request.num_cached_tokens is None:
                request.num_cached_tokens = cached
                self.cache_stats.queried_tokens += len(request.prompt_ids)
                self.cache_stats.hit_tokens += cached
            self.waiting.remove(request)
            self.running.append(request)
            prefilling.append(request)
            request.status = Status.RUNNING
            chosen.append((request, self._allocate(request, n)))
            budget -= n

        if not chosen:
            return None
        return self._build(chosen)

    @property
    def _num_free(self) -> int:
        """Slots free in both pools: a step's new tokens take one of each."""
        if self.windows is None:
            return self.allocator.num_free
        return min(self.allocator.num_free, self.windows.slots.num_free)

    def _allocate(self, request: Request, n: int) -> list[int]:
        """n token slots (and n window slots, kept on the request) for the request's next tokens."""
        if self.windows is not None:
            request.window_slots.extend(self.windows.slots.allocate(n))
        return self.allocator.allocate(n)

    def _make_room(self, n: int, keep: set[Request]) -> bool:
        """Frees slots until n are free: unreferenced cached tokens first, then by preempting the
        youngest idle running requests."""
        while self._num_free < n:
            if self._evict(n):
                continue
            victims = [r for r in self.running if not r.in_flight and r not in keep]
            if not victims:
                return False
            self._preempt(max(victims, key=lambda r: r.req_id))
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)
        request.num_computed = 0
        request.status = Status.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self._preempted.append(request.req_id)
        self.waiting.append(request)
        self.waiting.sort(key=lambda r: r.req_id)

    # -- the prefix cache ------------------------------------------------------------------------
    def _shares_pending_prefix(self, request: Request, cached: int, prefilling: list[Request]) -> bool:
        """Whether the PENDING_PREFIX_TOKENS prompt tokens after the request's cached prefix are
        also the prompt of a request whose prefill is under way (in flight, chosen for this batch,
        or not yet through its prompt): they will be cached when its step completes. As SGLang's
        in-batch prefix check; without it, 64 requests sharing a system prompt computed it once per
        request admitted in the first steps."""
        if self.cache is None:
            return False
        probe = cached + PENDING_PREFIX_TOKENS
        if len(request.prompt_ids) <= probe:
            return False
        head = request.prompt_ids[:probe]
        return any(len(o.prompt_ids) >= probe and o.prompt_ids[:probe] == head for o in prefilling)

    def _lock_cached_prefix(self, request: Request) -> int:
        """Points a request about to be admitted at its longest cached prefix; returns its length.

        The last token is always computed: its logits are what the request samples from.
        """
        if self.cache is None:
            return 0
        node, slots = self.cache.match(request.all_ids[: request.num_tokens - 1])
        self.cache.lock(node)
        request.cache_node, request.cache_depth = node, len(slots)
        request.slots, request.num_computed = slots, len(slots)
        request.unsent_prefix = tuple(slots)
        return len(slots)

    def _cache_computed(self, request: Request) -> None:
        """Caches a request's computed tokens (after its step completed on every stage)."""
        if self.cache is None or request.status is not Status.RUNNING:
            return
        computed = request.num_computed
        node, taken = self.cache.insert(request.all_ids[:computed], request.slots, request.cache_node,
                                        request.cache_depth)
        request.owned.difference_update(taken)
        self.cache.lock(node)
        self.cache.unlock(request.cache_node)
        request.cache_node, request.cache_depth = node, computed

    def _release(self, request: Request) -> None:
        """Frees the slots a request owns (and its window slots), and unlocks the cached ones it read."""
        self.allocator.free(request.owned)
        if request.cache_node is not None:
            self.cache.unlock(request.cache_node)
        request.slots, request.owned, request.cache_node, request.cache_depth = [], set(), None, 0
        if self.windows is not None:
            self.windows.slots.free(request.window_slots)
            request.window_slots, request.window_first = [], 0

    @property
    def evictable_tokens(self) -> int:
        """Cached tokens no request reads: free on demand."""
        return self.cache.evictable_tokens if self.cache is not None else 0

    @property
    def cached_tokens(self) -> int:
        return self.cache.cached_tokens if self.cache is not None else 0

    def _evict(self, n: int) -> int:
        """Evicts cached tokens until n slots are free; returns how many slots it freed."""
        short = n - self.allocator.num_free
        if self.cache is None or short <= 0:
            return 0
        freed = self.cache.evict(short)
        self.allocator.free(freed)
        return len(freed)

    def _build(self, chosen: list[tuple[Request, list[int]]]) -> ScheduledBatch:
        seqs, new_requests = [], []
        for request, new_slots in chosen:
            cached_slots, request.unsent_prefix = request.unsent_prefix, ()
            request.slots.extend(new_slots)
            request.owned.update(new_slots)
            request.num_computed += len(new_slots)
            request.in_flight = True
            if not request.announced:
                new_requests.append(NewRequest(request.req_id, request.params, request.seed))
                request.announced = True
            sample = request.num_computed == request.num_tokens
            window_new = tuple(request.window_slots[-len(new_slots):]) if self.windows is not None else ()
            seqs.append(SeqStep(request.req_id, request.num_computed, tuple(new_slots), sample,
                                cached_slots=cached_slots, new_window_slots=window_new))
        message = StepMessage(
            step_id=self._step_id,
            seqs=tuple(seqs),
            new_requests=tuple(new_requests),
            preempted=tuple(self._preempted),
            finished=tuple(self._finished),
        )
        self._step_id += 1
        self._preempted, self._finished = [], []
        return ScheduledBatch(message, [r for r, _ in chosen])

    def release_message(self) -> StepMessage:
        """A message with no sequences, to pass pending releases on (used before shutdown)."""
        message = StepMessage(step_id=self._step_id, preempted=tuple(self._preempted), finished=tuple(self._finished))
        self._step_id += 1
        self._preempted, self._finished = [], []
        return message

    def complete(self, batch: ScheduledBatch, sampled: Iterable[int]) -> list[tuple[Request, int | None]]:
        """Applies a finished step: each request that sampled gets its token.

        Returns (request, token or None) for every request of the batch; the engine decides
        whether a token ends its request.
        """
        tokens = iter(sampled)
        results = []
        for request, seq in zip(batch.requests, batch.message.seqs):
            request.in_flight = False
            self._cache_computed(request)
            if self.windows is not None and request.window_slots:
                # what no later query sees goes back to the window pool (stages drop it at their next step)
                request.window_first = self.windows.slide(request.window_slots, request.window_first,
                                                          request.num_computed)
            token = next(tokens) if seq.sample else None
            results.append((request, token))
        return results
