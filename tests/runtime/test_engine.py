"""The engine end to end: stage processes on gloo, agreed capacity, continuous batching."""

from __future__ import annotations

import random

import pytest
import torch

from pipesplit import LLM, SamplingParams
from pipesplit.planner.spec import load_spec
from pipesplit.runtime.plan_bridge import packs_tied_head, runtime_plan
from tests.planner.test_partition import compositions

GiB = 1 << 30


def hf_greedy(folder, prompts, max_tokens):
    """Independent reference: transformers' greedy generate, one prompt at a time."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for ids, n in zip(prompts, max_tokens):
            x = torch.tensor([ids])
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)
            outs.append(y[0, len(ids):].tolist())
    return outs


def checkpoint_stage_bytes(folder, partition, mtp: bool = False, tied_copy: bool = False) -> list[int]:
    """Bytes each stage holds, summed from the checkpoint's own tensor headers (float32): its layers,
    the embedding on the first stage, final norm and lm_head (the embedding when tied) on the last,
    and with `mtp` the module stored after the last layer (model.layers.<num_layers>.*). A tied
    head on the embedding's own stage reads the embedding, or with `tied_copy` a copy of its own."""
    import json
    import re
    from pathlib import Path

    from safetensors import safe_open

    sizes = {}
    for file in Path(folder).glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            sizes.update({name: f.get_slice(name).get_shape() for name in f.keys()})
    nbytes = {name: 4 * int(torch.tensor(shape).prod()) if shape else 4 for name, shape in sizes.items()}
    num_layers = sum(partition)
    per_layer = [0] * (num_layers + 1)
    for name, n in nbytes.items():
        found = re.match(r"model\.layers\.(\d+)\.", name)
        if found:
            per_layer[int(found.group(1))] += n
    tied = json.loads((Path(folder) / "config.json").read_text()).get("tie_word_embeddings", False)
    embed = nbytes["model.embed_tokens.weight"]
    head = nbytes["model.norm.weight"] + (embed if tied else nbytes["lm_head.weight"])
    stages, start = [], 0
    for i, n in enumerate(partition):
        total = sum(per_layer[start : start + n])
        if i == 0:
            total += embed
        if i == len(partition) - 1:
            total += head - (embed if tied and len(partition) == 1 and not tied_copy else 0)
            total += per_layer[num_layers] if mtp else 0
        stages.append(total)
        start += n
    return stages


def kv_bytes_per_layer_token(folder) -> int:
    """float32 K and V (or MLA's latent + rope key) of one token in one layer, from config.json."""
    import json
    from pathlib import Path

    c = json.loads((Path(folder) / "config.json").read_text())
    if c.get("kv_lora_rank"):
        return 4 * (c["kv_lora_rank"] + c["qk_rope_head_dim"])
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return 4 * 2 * c["num_key_value_heads"] * head_dim


def check_plan_against_brute_force(llm, folder, pp, partition, budget_bytes, mtp=False, tied_copy=False) -> None:
    reports = llm.stage_reports
    check_stages_against_brute_force(folder, pp, partition, budget_bytes, llm.plan.partition,
                                     [r.param_bytes for r in reports], [r.kv_tokens for r in reports],
                                     llm.max_total_num_tokens, mtp, tied_copy)


def check_stages_against_brute_force(folder, pp, partition, budget_bytes, chosen, param_bytes, kv_tokens,
                                     max_total_num_tokens, mtp=False, tied_copy=False) -> None:
    """The stages' measured bytes equal the checkpoint's; their KV tokens follow (budget - weights) //
    (layers x KV bytes); without a partition the chosen split has the best capacity of every contiguous one."""
    per_token = kv_bytes_per_layer_token(folder)
    chosen = tuple(chosen)

    def capacity(split):
        weights = checkpoint_stage_bytes(folder, split, mtp, tied_copy)
        return min((budget_bytes - w) // (n * per_token) for w, n in zip(weights, split)), weights

    if partition:
        assert chosen == tuple(int(n) for n in partition.split(","))
    else:
        assert len(chosen) == pp
        best = max(capacity(split)[0] for split in compositions(sum(chosen), pp))
        assert capacity(chosen)[0] == best
    tokens, weights = capacity(chosen)
    assert list(param_bytes) == weights
    assert list(kv_tokens) == [(budget_bytes - w) // (n * per_token) for w, n in zip(weights, chosen)]
    assert max_total_num_tokens == tokens


@pytest.mark.parametrize(
    "name,pp,partition",
    [("llama", 2, None), ("llama", 3, "1,3,1"), ("llama_tied", 2, "3,1"), ("llama_tied", 3, None), ("qwen2", 2, "1,3"),
     ("llama_tied", 1, None)],
)
def test_capacity_and_weights_equal_the_planners_prediction(tiny_checkpoints, name, pp, partition):
    folder = str(tiny_checkpoints[name])
    budget_gib = 0.004
    spec = load_spec(folder)
    budgets = (int(budget_gib * GiB),) * pp
    # a tied head on the embedding's stage (PP1), on a CPU whose oneDNN packs float32: a packed copy
    copy = packs_tied_head(spec, "cpu", "float32")
    assert copy == (name == "llama_tied")
    predicted = runtime_plan(spec, pp, None, partition, "float32", budgets, packed_tied_head=copy)
    with LLM(folder, pp=pp, partition=partition, mem_budget_gib=budget_gib, dtype="float32", log=False) as llm:
        check_plan_against_brute_force(llm, folder, pp, partition, budgets[0], tied_copy=copy)
        assert llm.max_total_num_tokens == predicted.max_total_num_tokens  # the planner predicted it
        for stage, report in zip(predicted.stages, llm.stage_reports):
            assert report.param_bytes == stage.weight_bytes
            assert report.kv_tokens == stage.kv_tokens
        assert llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2))[0].finish_reason == "length"


def test_a_budget_too_small_for_the_weights_fails_before_any_process_starts(tiny_checkpoints, monkeypatch):
    import pipesplit.runtime.engine as engine
    from pipesplit.errors import UserError

    def no_spawn(*args, **kwargs):
        raise AssertionError("stage processes were started")

    monkeypatch.setattr(engine, "SpawnedStages", no_spawn)
    with pytest.raises(UserError, match=r"stage 0 needs .* but its budget is .*; raise --mem-budget"):
        LLM(str(tiny_checkpoints["llama"]), pp=2, mem_budget_gib=0.00001, log=False)


def _workload(n, seed=0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(1, 60))] for _ in range(n)]
    max_tokens = [rng.randint(1, 12) for _ in range(n)]
    return prompts, max_tokens


@pytest.fixture(scope="module")
def workload_and_reference(tiny_checkpoints):
    prompts, max_tokens = _workload(200)
    return prompts, max_tokens, hf_greedy(tiny_checkpoints["llama"], prompts, max_tokens)


@pytest.mark.parametrize("pp", [2, 3])
def test_200_concurrent_requests_each_equal_greedy_alone(tiny_checkpoints, workload_and_reference, pp):
    prompts, max_tokens, expected = workload_and_reference
    params = [SamplingParams(temperature=0, max_tokens=n) for n in max_tokens]
    with LLM(str(tiny_checkpoints["llama"]), dtype="float32", pp=pp, mem_budget_gib=0.05, max_batch_tokens=256,
             chunked_prefill_size=32, log=False) as llm:
        outputs = llm.generate(prompts, params)
        assert llm.engine.usage()["kv_tokens_used"] == 0
    assert [list(o.token_ids) for o in outputs] == expected
    assert all(o.finish_reason == "length" for o in outputs)


def test_tiny_pool_preempts_and_outputs_stay_exact(tiny_checkpoints, workload_and_reference):
    prompts, max_tokens, expected = workload_and_reference
    folder = str(tiny_checkpoints["llama"])
    spec = load_spec(folder)
    # the smallest budget whose capacity still holds the longest request (prompt + output)
    longest = max(len(p) + n for p, n in zip(prompts, max_tokens))
    budget = 300_000
    while runtime_plan(spec, 2, None, None, "float32", (budget, budget)).max_total_num_tokens < longest + 8:
        budget += 4096
    params = [SamplingParams(temperature=0, max_tokens=n) for n in max_tokens]
    with LLM(folder, dtype="float32", pp=2, mem_budget_gib=budget / GiB, log=False) as llm:
        assert llm.max_total_num_tokens < 4 * longest
        outputs = llm.generate(prompts, params)
        assert llm.engine.stats.preemptions > 0
        assert llm.engine.usage()["kv_tokens_used"] == 0
    assert [list(o.token_ids) for o in outputs] == expected


def test_seeded_sampling_repeats_and_does_not_depend_on_the_batch(tiny_checkpoints):
    with LLM(str(tiny_checkpoints["qwen3"]), dtype="float32", pp=2, mem_budget_gib=0.01, log=False) as llm:
        p = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=12, seed=1234)
        alone = llm.generate([[5, 6, 7]], p)[0].token_ids
        crowd = llm.generate([[5, 6, 7]] * 3 + [[9] * 20] * 5, [p] * 3 + [SamplingParams(max_tokens=12)] * 5)
        other = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=12, seed=99))
    assert all(o.token_ids == alone for o in crowd[:3])
    assert other[0].token_ids != alone


def test_stop_token_ids_and_streaming(tiny_checkpoints, workload_and_reference):
    prompts, _, _ = workload_and_reference
    folder = tiny_checkpoints["llama"]
    full = hf_greedy(folder, [prompts[0]], [10])[0]
    stop_at = full[4]
    with LLM(str(folder), dtype="float32", pp=2, mem_budget_gib=0.01, log=False) as llm:
        out = llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=(stop_at,)))[0]
        streamed = list(llm.stream(prompts[0], SamplingParams(temperature=0, max_tokens=10)))
    assert list(out.token_ids) == full[: full.index(stop_at) + 1] and out.finish_reason == "stop"
    assert [t for s in streamed for t in s.delta_token_ids] == full
    assert [s.finished for s in streamed] == [False] * 9 + [True]


@pytest.mark.parametrize("name,partition", [("mistral", "2,2"), ("qwen3", "3,3"), ("llama3_rope", "1,3"),
                                            ("qwen2", "2,2")])
def test_every_dense_family_equals_transformers_through_the_engine(tiny_checkpoints, name, partition):
    """Stage processes at PP 2 (mistral's sliding window of 6 and llama3's rope scaling past 16
    positions are both exceeded by the 17-token prompt)."""
    from tests.runtime.test_models import MAX_NEW, PROMPTS
    from tests.runtime.test_models import hf_greedy as hf_greedy_batch

    folder = str(tiny_checkpoints[name])
    with LLM(folder, pp=2, partition=partition, mem_budget_gib=0.01, dtype="float32", chunked_prefill_size=8,
             log=False) as llm:
        outputs = llm.generate(list(PROMPTS), SamplingParams(temperature=0, max_tokens=MAX_NEW))
    assert [list(o.token_ids) for o in outputs] == hf_greedy_batch(folder, PROMPTS, MAX_NEW)


def test_seeded_sampling_survives_preemption_chunked_prefill_and_pp(tiny_checkpoints):
    """Seeded sampled outputs are the same at PP 1 with room to spare, at PP 2 in a pool so small that
    requests are preempted and recomputed (prefill in chunks of 8), and for a request alone."""
    folder = str(tiny_checkpoints["qwen3"])
    prompts, _ = _workload(40, seed=3)
    params = [SamplingParams(temperature=0.9, top_p=0.95, top_k=50, max_tokens=12, seed=100 + i)
              for i in range(len(prompts))]
    with LLM(folder, pp=1, mem_budget_gib=0.01, dtype="float32", log=False) as llm:
        roomy = [o.token_ids for o in llm.generate(prompts, params)]
    spec = load_spec(folder)
    longest = max(len(p) for p in prompts) + 12
    budget = 200_000
    while runtime_plan(spec, 2, None, None, "float32", (budget, budget)).max_total_num_tokens < longest + 8:
        budget += 4096
    with LLM(folder, pp=2, mem_budget_gib=budget / GiB, dtype="float32", chunked_prefill_size=8,
             max_batch_tokens=64, log=False) as llm:
        assert llm.max_total_num_tokens < 3 * longest
        tight = [o.token_ids for o in llm.generate(prompts, params)]
        assert llm.engine.stats.preemptions > 0
        alone = llm.generate(prompts[5], params[5])[0].token_ids
    assert tight == roomy
    assert alone == roomy[5]
    assert len(set(roomy)) > 30  # the seeds do make different draws
