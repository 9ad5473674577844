"""Prefix caching through the real engine: stage processes follow rank 0's cached slots.

Greedy outputs with the cache on equal those with it off and transformers' (each prompt alone),
for a dense model and the MLA (DeepSeek-shaped) model at PP 1, 2 and 3; the workload has prompts
that share a prefix, prompts that are an exact prefix of another and prompts that are fully cached.
"""

from __future__ import annotations

import random

import pytest

from pipesplit import LLM, SamplingParams
from tests.runtime.test_engine import hf_greedy

MAX_TOKENS = 6


def _shared_prefix_workload(first_outputs, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Two waves: the second is submitted after the first finished, so it finds the cache warm.
    first_outputs(prompts) gives the first wave's greedy outputs (for a second chat turn)."""
    rng = random.Random(seed)
    system = [rng.randrange(3, 250) for _ in range(40)]
    first = [system + [rng.randrange(3, 250) for _ in range(rng.randint(1, 12))] for _ in range(5)]
    first.append(system[:17])  # an exact prefix of every other prompt
    second = [
        first[0],  # fully cached: only its last token is computed
        first[1] + first_outputs(first[1:2])[0] + [rng.randrange(3, 250) for _ in range(5)],  # a second turn
        system[:17],  # a cached exact prefix
        system[:30],  # ends inside a cached edge: the tree splits there
        system + [rng.randrange(3, 250) for _ in range(9)],
        [rng.randrange(3, 250) for _ in range(20)],  # shares nothing
    ]
    return first, second


def _run(folder: str, pp: int, partition: str | None, cache: bool, waves) -> tuple[list[list[int]], list[int]]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    tokens, cached = [], []
    with LLM(folder, pp=pp, partition=partition, mem_budget_gib=0.01, chunked_prefill_size=16, dtype="float32",
             enable_prefix_caching=cache, log=False) as llm:
        for wave in waves:
            outs = llm.generate(wave, params)
            tokens += [list(o.token_ids) for o in outs]
            cached += [o.num_cached_tokens for o in outs]
        usage = llm.engine.usage()
        # every slot is free or held by the cache alone (evictable, so counted free)
        assert usage["kv_tokens_used"] == 0 and usage["kv_tokens_free"] == llm.max_total_num_tokens
        assert usage["kv_tokens_cached"] == llm.engine.allocator.num_used
        assert (usage["kv_tokens_cached"] > 0) == cache
    return tokens, cached


_REFERENCES: dict[str, tuple] = {}


def _workload_and_reference(folder: str):
    """The two waves and transformers' greedy outputs for them, once per model."""
    if folder not in _REFERENCES:
        first, second = _shared_prefix_workload(lambda ps: hf_greedy(folder, ps, [MAX_TOKENS] * len(ps)))
        prompts = first + second
        _REFERENCES[folder] = first, second, hf_greedy(folder, prompts, [MAX_TOKENS] * len(prompts))
    return _REFERENCES[folder]


@pytest.mark.parametrize(
    "model,pp,partition",
    [("llama", 1, None), ("llama", 2, "2,3"), ("llama", 3, "1,3,1"),
     ("deepseek_v3", 1, None), ("deepseek_v3", 2, "2,3"), ("deepseek_v3", 3, "1,2,2")],
)
def test_cache_on_equals_transformers_and_cache_off(tiny_checkpoints, tiny_moe_checkpoints, model, pp, partition):
    folder = str((tiny_checkpoints if model == "llama" else tiny_moe_checkpoints)[model])
    first, second, expected = _workload_and_reference(folder)
    on, cached = _run(folder, pp, partition, True, [first, second])
    assert on == expected
    if pp == 2:  # the same run without the cache: same tokens, nothing reported cached
        off, cached_off = _run(folder, pp, partition, False, [first, second])
        assert off == on and cached_off == [0] * len(on)
    hits = cached[len(first):]
    assert hits[0] == len(second[0]) - 1  # fully cached: all but the last token
    assert hits[1] == len(first[1]) + MAX_TOKENS - 1  # the first turn and its outputs fed back
    assert hits[2] == len(second[2]) - 1 and hits[3] == len(second[3]) - 1
    assert hits[4] >= 40 and hits[5] == 0


def test_generate_json_reports_cached_tokens(tiny_checkpoints):
    """The second of two identical prompts waits for the first (a 4-token step budget) and then
    reads all but its last token from the cache; --disable-prefix-cache turns that off."""
    import json
    import os
    import subprocess
    import sys

    def run(*extra: str) -> list[int]:
        cmd = [sys.executable, "-m", "pipesplit", "generate", str(tiny_checkpoints["llama"]), "--prompt-ids",
               "5,6,7,8,9,10,11,12,13,14,15,16", "--prompt-ids", "5,6,7,8,9,10,11,12,13,14,15,16", "--max-tokens",
               "2", "--max-batch-tokens", "4", "--chunked-prefill-size", "4", "--mem-budget", "0.01", "--json", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                              timeout=120)
        assert proc.returncode == 0, proc.stderr
        return [o["cached_tokens"] for o in json.loads(proc.stdout)["outputs"]]

    assert run() == [0, 11]
    assert run("--disable-prefix-cache") == [0, 0]
