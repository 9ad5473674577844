"""Scheduler and slot allocator: never over-commit the KV pool, never leak a slot, lose no request."""

from __future__ import annotations

import collections

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipesplit.runtime.kv_cache import SlotAllocator, WindowSlots, window_start
from pipesplit.runtime.sampler import SamplingParams
from pipesplit.runtime.scheduler import Request, Scheduler, SchedulerConfig, Status


def test_allocator_hands_out_each_slot_once():
    alloc = SlotAllocator(5)
    a = alloc.allocate(3)
    b = alloc.allocate(2)
    assert sorted(a + b) == [0, 1, 2, 3, 4]
    with pytest.raises(MemoryError):
        alloc.allocate(1)
    alloc.free(a)
    with pytest.raises(ValueError, match="freed twice"):
        alloc.free(a[:1])
    assert alloc.num_free == 3 and alloc.num_used == 2


def drive_fake_pipeline(sched, reqs, micro_batches, rng, abort_every, sample, on_scheduled, after_step) -> None:
    """Drives the scheduler as the engine does, through a fake pipeline of depth micro_batches:
    requests arrive at random, one is aborted every abort_every steps, sample(n) gives a step's
    n tokens; on_scheduled(batch) checks each new batch and after_step() the state after every
    step. Fails on no progress and on a deadlock."""
    arrivals = collections.deque(reqs)
    in_flight: collections.deque = collections.deque()
    steps = 0
    while arrivals or sched.num_unfinished:
        steps += 1
        assert steps < 20_000, "no progress"
        if arrivals and rng.random() < 0.5:
            sched.add(arrivals.popleft())
        if abort_every and steps % abort_every == 0 and sched.running:
            victim = rng.choice(sched.running)
            if victim.in_flight:
                victim.abort_requested = True
            else:
                sched.finish(victim, "abort")
        batch = sched.schedule() if len(in_flight) < micro_batches else None
        if batch is not None:
            on_scheduled(batch)
            in_flight.append(batch)
        elif in_flight:
            done = in_flight.popleft()
            for r, tok in sched.complete(done, sample(done.message.num_samples)):
                if r.abort_requested:
                    sched.finish(r, "abort")
                elif tok is not None:
                    r.output_ids.append(tok)
                    if len(r.output_ids) >= r.params.max_tokens or r.num_tokens >= r.max_context:
                        sched.finish(r, "length")
        elif not arrivals and sched.num_unfinished:
            pytest.fail(f"deadlock: {sched.num_unfinished} requests left, nothing in flight, nothing scheduled")
        after_step()


def _simulate(capacity, micro_batches, requests, budget, chunk, abort_every, seed, window=None):
    """Drives the scheduler like the engine does, with a fake pipeline of depth micro_batches.

    window: the model has sliding-window layers, whose pool is sized by window_pool_slots; a
    stage's view of every sequence's window slots (Stage._slide_window, fed the step messages)
    must match rank 0's at every step."""
    import random
    from types import SimpleNamespace

    from pipesplit.planner.partition import window_pool_slots
    from pipesplit.runtime.stage import Stage

    rng = random.Random(seed)
    alloc = SlotAllocator(capacity)
    windows = WindowSlots(window, window_pool_slots(window, 64, budget, micro_batches)) if window else None
    sched = Scheduler(SchedulerConfig(micro_batches, budget, 64, chunk), alloc, windows=windows)
    stage = SimpleNamespace(window_slots={}, rank=1, spec=SimpleNamespace(sliding_window=window))
    reqs = []
    for i, (prompt_len, max_tokens) in enumerate(requests):
        r = Request(i, [1] * prompt_len, SamplingParams(max_tokens=max_tokens), seed=i, max_context=capacity)
        reqs.append(r)

    def on_scheduled(batch) -> None:
        for req_id in batch.message.preempted + batch.message.finished:
            stage.window_slots.pop(req_id, None)
        for r, seq in zip(batch.requests, batch.message.seqs):
            assert r.slots[-len(seq.new_slots):] == list(seq.new_slots)
            assert len(r.slots) == seq.context_len == r.num_computed
            if window:
                assert list(seq.new_window_slots) == r.window_slots[-len(seq.new_slots):]
                assert Stage._slide_window(stage, seq) == r.window_slots

    def after_step() -> None:
        live = [r for r in reqs if r.status is Status.RUNNING]
        used = sum(len(r.slots) for r in live)
        assert used == alloc.num_used <= capacity
        assert len({s for r in live for s in r.slots}) == used
        if window:
            held = sum(len(r.window_slots) for r in live)
            assert held == windows.slots.num_used and len({s for r in live for s in r.window_slots}) == held
            for r in live:
                if not r.in_flight:  # between steps: exactly what the next token sees
                    assert len(r.window_slots) == r.num_computed - r.window_first == min(r.num_computed, window - 1)

    drive_fake_pipeline(sched, reqs, micro_batches, rng, abort_every, lambda n: [7] * n, on_scheduled, after_step)
    assert alloc.num_used == 0 and alloc.num_free == capacity
    assert windows is None or windows.slots.num_used == 0
    for r in reqs:
        assert r.status is Status.FINISHED
        if r.finish_reason == "length":
            assert len(r.output_ids) == r.params.max_tokens or r.num_tokens >= capacity
    return reqs


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    capacity=st.integers(24, 200),
    micro_batches=st.integers(1, 4),
    requests=st.lists(st.tuples(st.integers(1, 20), st.integers(1, 12)), min_size=1, max_size=25),
    budget=st.integers(1, 64),
    chunk=st.integers(1, 32),
    abort_every=st.sampled_from([0, 0, 7, 13]),
    seed=st.integers(0, 1000),
    window=st.sampled_from([None, None, 1, 3, 8]),
)
def test_random_workloads_never_overcommit_or_leak(capacity, micro_batches, requests, budget, chunk, abort_every, seed,
                                                   window):
    _simulate(capacity, micro_batches, requests, budget, chunk, abort_every, seed, window)


def test_window_pool_of_the_planned_size_never_preempts_more_than_the_token_pool():
    """The window pool is sized so that it never runs out: the same workload preempts exactly as
    often with it as without."""
    workload = [(10, 12)] * 8 + [(3, 20)] * 5
    plain = _simulate(30, 2, workload, 64, 16, 0, 0)
    windowed = _simulate(30, 2, workload, 64, 16, 0, 0, window=4)
    assert [r.num_preemptions for r in windowed] == [r.num_preemptions for r in plain]
    assert sum(r.num_preemptions for r in plain) > 0


def test_window_slots_slide_and_are_reused():
    windows = WindowSlots(3, 4)
    held = windows.slots.allocate(4)  # positions 0..3
    assert windows.slide(held, 0, 4) == 2 and held == [2, 3]  # the next query (position 4) sees 2..4
    assert windows.slots.allocate(2) == [1, 0]  # the freed ones first
    assert window_start(10, 3, 3) == 5 and window_start(2, 2, 8) == 0


def test_tiny_pool_forces_preemption_and_everyone_finishes():
    reqs = _simulate(30, 2, [(10, 12)] * 8, 64, 16, 0, 0)
    assert sum(r.num_preemptions for r in reqs) > 0
    assert all(len(r.output_ids) == 12 for r in reqs)


def test_micro_batch_takes_a_share_of_live_requests():
    alloc = SlotAllocator(1000)
    sched = Scheduler(SchedulerConfig(micro_batches=2, max_batch_tokens=4096), alloc)
    for i in range(10):
        sched.add(Request(i, [1, 2, 3], SamplingParams(), seed=0, max_context=1000))
    first, second = sched.schedule(), sched.schedule()
    assert len(first.requests) == 5 and len(second.requests) == 5
    assert sched.schedule() is None  # all ten are in flight
    assert {r.req_id for r in first.requests}.isdisjoint(r.req_id for r in second.requests)


def test_chunked_prefill_samples_only_on_the_last_chunk():
    alloc = SlotAllocator(100)
    sched = Scheduler(SchedulerConfig(chunked_prefill_size=4), alloc)
    sched.add(Request(0, list(range(10)), SamplingParams(), seed=0, max_context=100))
    lens = []
    while True:
        batch = sched.schedule()
        seq = batch.message.seqs[0]
        lens.append((len(seq.new_slots), seq.sample))
        sched.complete(batch, [5] if seq.sample else [])
        if seq.sample:
            break
    assert lens == [(4, False), (4, False), (2, True)]
