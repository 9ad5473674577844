"""The prefix cache: the radix tree on its own, then the scheduler with it under random workloads.

The property test follows the step messages the way a stage does (a slot list per request, reset
by `cached_slots`) and keeps, per slot, which token sequence's K/V was written there: every
context a step attends over must hold exactly the request's own tokens, in order.
"""

from __future__ import annotations

import collections
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipesplit.runtime.kv_cache import SlotAllocator
from pipesplit.runtime.prefix_cache import PrefixCache
from pipesplit.runtime.sampler import SamplingParams
from pipesplit.runtime.scheduler import Request, Scheduler, SchedulerConfig, Status
from tests.runtime.test_scheduler import drive_fake_pipeline


# -- the tree -------------------------------------------------------------------------------------
def test_match_returns_the_longest_cached_prefix_and_splits_the_edge():
    cache = PrefixCache()
    cache.insert([1, 2, 3, 4], [10, 11, 12, 13])
    node, slots = cache.match([1, 2, 9])
    assert slots == [10, 11] and node.tokens == [1, 2]
    assert sorted(len(n.tokens) for n in cache.nodes()) == [2, 2]
    assert cache.match([1, 2, 3, 4, 5])[1] == [10, 11, 12, 13]
    assert cache.match([7])[1] == []
    assert cache.cached_tokens == 4


def test_insert_takes_only_the_slots_of_new_tokens():
    cache = PrefixCache()
    assert cache.insert([1, 2, 3], [10, 11, 12])[1] == [10, 11, 12]
    # [1, 2] are cached already (slots 10, 11): the caller keeps its duplicates 20, 21
    node, taken = cache.insert([1, 2, 5, 6], [20, 21, 22, 23])
    assert taken == [22, 23] and node.tokens == [5, 6]
    assert cache.match([1, 2, 5, 6])[1] == [10, 11, 22, 23]
    assert cache.insert([1, 2], [30, 31])[1] == []
    assert cache.cached_tokens == 5


def test_locked_paths_are_never_evicted_and_lru_goes_first():
    cache = PrefixCache()
    a, _ = cache.insert([1, 2, 3], [0, 1, 2])
    b, _ = cache.insert([4, 5], [3, 4])
    c, _ = cache.insert([6], [5])
    cache.match([4, 5])  # b is now more recent than c
    cache.lock(a)
    assert cache.evictable_tokens == 3
    assert cache.evict(1) == [5]  # c: unlocked and least recently used
    assert cache.evict(10) == [3, 4]  # then b; a is locked
    assert cache.evictable_tokens == 0 and cache.cached_tokens == 3
    cache.unlock(a)
    assert cache.evictable_tokens == 3 and sorted(cache.evict(10)) == [0, 1, 2]
    with pytest.raises(RuntimeError, match="unlocked more often"):
        cache.unlock(a)


def test_eviction_trims_a_long_leaf_from_its_end():
    cache = PrefixCache()
    cache.insert([1, 2, 3, 4, 5], [10, 11, 12, 13, 14])
    assert cache.evict(2) == [13, 14]
    assert cache.match([1, 2, 3, 4, 5])[1] == [10, 11, 12]
    assert cache.cached_tokens == cache.evictable_tokens == 3


def test_a_growing_request_extends_its_own_leaf_in_place():
    cache = PrefixCache()
    node, _ = cache.insert([1, 2, 3], [0, 1, 2])
    cache.lock(node)
    grown, taken = cache.insert([1, 2, 3, 4, 5], [0, 1, 2, 3, 4], node, 3)
    assert grown is node and taken == [3, 4] and len(cache.nodes()) == 1
    assert cache.cached_tokens == 5 and cache.evictable_tokens == 0
    # a leaf that a second request reads too gets a child instead: the other request's path stays put
    cache.lock(node)
    child, taken = cache.insert([1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5], node, 5)
    assert child is not node and child.parent is node and taken == [5] and node.tokens == [1, 2, 3, 4, 5]


def test_evicting_a_leaf_makes_its_unreferenced_parent_evictable():
    cache = PrefixCache()
    cache.insert([1, 2, 3], [0, 1, 2])
    cache.insert([1, 2, 4], [0, 1, 3])  # shares [1, 2]; the tree splits there
    assert cache.cached_tokens == 4
    assert sorted(cache.evict(4)) == [0, 1, 2, 3]
    assert cache.nodes() == [] and cache.cached_tokens == 0 == cache.evictable_tokens


def test_split_keeps_the_reference_counts():
    cache = PrefixCache()
    node, _ = cache.insert([1, 2, 3, 4], [0, 1, 2, 3])
    cache.lock(node)
    upper, _ = cache.match([1, 2])
    assert upper.refs == node.refs == 1 and cache.evictable_tokens == 0
    cache.unlock(node)
    assert upper.refs == 0 and cache.evictable_tokens == 4


# -- the scheduler with the cache -------------------------------------------------------------------
def _check_slots(sched: Scheduler, alloc: SlotAllocator, cache: PrefixCache, capacity: int) -> None:
    """Every slot is free, cached, or owned by one live request; the counts agree."""
    tree = [s for n in cache.nodes() for s in n.slots]
    owned = [s for r in sched.running for s in r.owned]
    assert len(tree) == len(set(tree)) == cache.cached_tokens
    assert len(owned) == len(set(owned))
    assert not set(tree) & set(owned)
    assert set(tree) | set(owned) <= alloc._used, "a slot is both free and referenced"
    assert alloc._used <= set(tree) | set(owned), "a slot leaked: allocated, yet neither cached nor owned"
    assert alloc.num_free + alloc.num_used == capacity
    for r in sched.waiting:
        assert not r.owned and r.cache_node is None
    expected_refs = collections.Counter()
    for r in sched.running:
        node, path_slots = r.cache_node, set()
        while node is not None and node is not cache.root:
            expected_refs[id(node)] += 1
            path_slots.update(node.slots)
            node = node.parent
        assert set(r.slots) <= r.owned | path_slots, "a request reads a slot nobody keeps for it"
    for node in cache.nodes():
        assert node.refs == expected_refs[id(node)] >= 0
    assert cache.evictable_tokens == sum(len(n.tokens) for n in cache.nodes() if n.refs == 0)


def _simulate_with_cache(capacity, micro_batches, prompts, max_tokens, budget, chunk, abort_every, seed):
    rng = random.Random(seed)
    alloc, cache = SlotAllocator(capacity), PrefixCache()
    sched = Scheduler(SchedulerConfig(micro_batches, budget, 64, chunk), alloc, cache)
    reqs = [Request(i, list(p), SamplingParams(max_tokens=m), seed=i, max_context=capacity)
            for i, (p, m) in enumerate(zip(prompts, max_tokens))]
    stage_slots: dict[int, list[int]] = {}  # what a stage knows, from the messages alone
    written: dict[int, tuple[int, ...]] = {}  # slot -> the token sequence whose last K/V it holds

    def on_scheduled(batch) -> None:
        message = batch.message
        for req_id in (*message.preempted, *message.finished):
            stage_slots.pop(req_id, None)
        for r, seq in zip(batch.requests, message.seqs):
            if seq.cached_slots:
                stage_slots[r.req_id] = list(seq.cached_slots)
            slots = stage_slots.setdefault(r.req_id, [])
            slots.extend(seq.new_slots)
            assert slots == r.slots and len(slots) == seq.context_len
            tokens = r.all_ids
            for pos in range(seq.context_len - len(seq.new_slots), seq.context_len):
                written[slots[pos]] = tuple(tokens[: pos + 1])
            for pos, slot in enumerate(slots):
                assert written.get(slot) == tuple(tokens[: pos + 1]), "a context reads another token's K/V"

    drive_fake_pipeline(sched, reqs, micro_batches, rng, abort_every, lambda n: [rng.randrange(3) for _ in range(n)],
                        on_scheduled, lambda: _check_slots(sched, alloc, cache, capacity))
    assert all(r.status is Status.FINISHED for r in reqs), "a request was lost"
    assert all(node.refs == 0 for node in cache.nodes())
    assert alloc.num_used == cache.cached_tokens == cache.evictable_tokens, "slots held by neither cache nor request"
    return reqs, sched


_prefixes = st.lists(st.integers(0, 2), min_size=0, max_size=16)


@st.composite
def _workload(draw):
    bases = draw(st.lists(_prefixes, min_size=1, max_size=3))
    n = draw(st.integers(1, 20))
    prompts = []
    for _ in range(n):
        base = draw(st.sampled_from(bases))
        prompts.append(base + draw(st.lists(st.integers(0, 2), min_size=0 if base else 1, max_size=8)))
    max_tokens = draw(st.lists(st.integers(1, 10), min_size=n, max_size=n))
    return prompts, max_tokens


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    workload=_workload(),
    capacity=st.integers(26, 160),
    micro_batches=st.integers(1, 4),
    budget=st.integers(1, 64),
    chunk=st.integers(1, 24),
    abort_every=st.sampled_from([0, 0, 5, 11]),
    seed=st.integers(0, 1000),
)
def test_random_shared_prefix_workloads_keep_every_slot_accounted(
    workload, capacity, micro_batches, budget, chunk, abort_every, seed
):
    prompts, max_tokens = workload
    _simulate_with_cache(capacity, micro_batches, prompts, max_tokens, budget, chunk, abort_every, seed)


def test_a_shared_prompt_is_computed_once_then_read_from_the_cache():
    system = list(range(3, 3 + 40))
    prompts = [system + [100 + i] for i in range(6)]
    reqs, sched = _simulate_with_cache(2000, 1, prompts, [4] * 6, 4096, 512, 0, 0)
    later = [r.num_cached_tokens for r in reqs[1:]]
    assert all(n >= len(system) for n in later), later
    assert sched.cache_stats.hit_tokens == sum(r.num_cached_tokens for r in reqs)
    assert sched.cache_stats.queried_tokens == sum(len(p) for p in prompts)


def test_requests_arriving_together_compute_a_shared_prefix_once():
    """Six requests share a 40-token prompt and arrive at once, with a seventh of its own: the
    first batch computes the shared prefix for one of them only (and the unrelated request); the
    others wait one step and then read all of it from the cache."""
    system = list(range(3, 3 + 40))
    prompts = [system + [100 + i] for i in range(6)] + [list(range(200, 230))]
    sched = Scheduler(SchedulerConfig(max_batch_tokens=4096, chunked_prefill_size=512),
                      SlotAllocator(2000), PrefixCache())
    reqs = [Request(i, p, SamplingParams(max_tokens=2), seed=0, max_context=2000) for i, p in enumerate(prompts)]
    for r in reqs:
        sched.add(r)
    first = sched.schedule()
    assert [r.req_id for r in first.requests] == [0, 6]
    second_too_early = sched.schedule()  # the prefix is still in flight: nobody else starts it
    assert second_too_early is None
    sched.complete(first, [1] * first.message.num_samples)
    second = sched.schedule()
    assert sorted(r.req_id for r in second.requests) == [0, 1, 2, 3, 4, 5, 6]
    assert all(reqs[i].num_cached_tokens == len(system) for i in range(1, 6))
    assert sched.cache_stats.hit_tokens == 5 * len(system)


def test_a_fully_cached_prompt_still_computes_its_last_token():
    prompt = [5, 6, 7, 8]
    reqs, _ = _simulate_with_cache(200, 1, [prompt, prompt], [3, 3], 4096, 512, 0, 0)
    assert reqs[1].num_cached_tokens == len(prompt) - 1


def _run_alone(sched: Scheduler, request: Request) -> None:
    sched.add(request)
    while request.status is not Status.FINISHED:
        batch = sched.schedule()
        for r, tok in sched.complete(batch, [1] * batch.message.num_samples):
            if tok is not None:
                r.output_ids.append(tok)
                if len(r.output_ids) >= r.params.max_tokens:
                    sched.finish(r, "length")


def test_a_full_pool_evicts_cached_tokens_before_preempting_anyone():
    alloc, cache = SlotAllocator(30), PrefixCache()
    sched = Scheduler(SchedulerConfig(), alloc, cache)
    _run_alone(sched, Request(0, [1] * 12, SamplingParams(max_tokens=3), seed=0, max_context=30))
    assert cache.cached_tokens == 14 and alloc.num_free == 16  # 12 prompt + 2 fed-back tokens stay cached
    _run_alone(sched, Request(1, [2] * 20, SamplingParams(max_tokens=6), seed=0, max_context=30))
    assert sched.num_preemptions == 0
    # request 1 needed 9 slots more than were free: request 0's leaf lost its last 9 tokens only,
    # so its first 5 stay cached beside request 1's 25
    assert cache.cached_tokens == 30 and alloc.num_used == 30
    assert len(cache.match([1] * 12)[1]) == 5
