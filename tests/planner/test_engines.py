"""Engine memory models (`--engine vllm|sglang`) against the capacity lines the engines printed.

The field cases (tests/planner/data/field_cases.json) are public logs; each test gives the planner
only what the user of that case stated (model, GPU, TP, PP, the flags they passed) and holds the
prediction within 1% of what the engine reported. The hybrid-attention allocators are checked
against the engines' rules written out by hand and against exhaustive search.
"""

from __future__ import annotations

import json
import math
import random
from fractions import Fraction
from pathlib import Path

import pytest

from pipesplit.cli import main
from pipesplit.errors import UserError
from pipesplit.planner.costs import cost_model, kv_bytes_per_token
from pipesplit.planner.engines import EngineModel, EngineSettings, sglang_defaults, visible_bytes
from pipesplit.planner.hardware import Device, GiB, MiB, resolve_devices
from pipesplit.planner.partition import SplitProblem, evaluate, max_kv, vllm
from pipesplit.planner.plan import make_plan
from pipesplit.planner.spec import load_spec, spec_from_config
from tests.planner.test_partition import compositions

CASES = {c["id"]: c for c in json.loads((Path(__file__).parent / "data" / "field_cases.json").read_text())["cases"]}


def plan_case(case: dict, strategy: str | None = None):
    """The plan for a field case from its stated settings only."""
    stated = case["stated"]
    engine = case["engine"]
    fraction = stated.get("gpu_memory_utilization" if engine == "vllm" else "mem_fraction_static")
    spec = load_spec(stated["model"])
    cost = cost_model(spec, tp=stated["tp"], kv_dtype=stated.get("kv_cache_dtype", "auto"))
    settings = EngineSettings(engine, fraction, max_model_len=stated.get("max_model_len"))
    devices = resolve_devices(stated["gpu"], None, stated["pp"])
    # the engines split by layer count: vLLM's get_pp_indices, SGLang's remainder-first
    split = strategy or ("vllm" if engine == "vllm" else "remainder-first")
    return make_plan(cost, devices, split, engine=EngineModel(spec, stated["tp"], settings), model=spec.name)


def within(predicted: float, reported: float, tolerance: float = 0.01) -> bool:
    return abs(predicted - reported) <= tolerance * reported


@pytest.mark.parametrize("case_id", ["V1", "V2", "V2-fp8", "S1", "S2"])
def test_reported_kv_tokens_within_one_percent(case_id):
    case = CASES[case_id]
    plan = plan_case(case)
    reported = case["reported"]["kv_tokens"]
    assert within(plan.max_total_num_tokens, reported), (plan.max_total_num_tokens, reported)


def test_v1_kv_bytes_and_weights():
    case = CASES["V1"]
    (stage,) = plan_case(case).stages
    assert within((stage.usable_bytes - stage.weight_bytes) / GiB, case["reported"]["kv_gib"])
    assert within(stage.weight_bytes / GiB, case["reported"]["weights_gib"])


@pytest.mark.parametrize("case_id", ["V4-PP2", "V4-PP4"])
def test_v4_rank0_kv_bytes(case_id):
    """Rank 0 of a vLLM PP run: KV = 79.19 GiB x 0.95 - the weights, activation and non-torch it logged."""
    case = CASES[case_id]
    plan = plan_case(case)
    logged = case["reported"]
    expected_kv = 79.19 * 0.95 - logged["rank0_weights_gib"] - logged["rank0_activation_gib"] - logged["rank0_non_torch_gib"]
    stage = plan.stages[0]
    assert plan.partition == vllm(32, case["stated"]["pp"])
    assert within((stage.usable_bytes - stage.weight_bytes) / GiB, expected_kv)
    assert within(stage.weight_bytes / GiB, logged["rank0_weights_gib"], 0.02)


def test_s2_k_size_and_load_begin_memory():
    case = CASES["S2"]
    plan = plan_case(case)
    spec = load_spec("llama-3.1-70b-instruct")
    k_gib = plan.max_total_num_tokens * spec.num_layers * kv_bytes_per_token(spec, tp=8) / 2 / GiB
    assert within(k_gib, case["reported"]["k_gib"])
    assert plan.memory_fraction == sglang_defaults(143771, 8, 1).mem_fraction_static  # nothing was passed


def test_s3_engine_bug_is_not_reproduced():
    """sglang#14254: every PP4 rank of a 40-layer model allocated a 40-layer pool (K 26.84 GB);
    pipesplit plans a pool for each rank's own 10 layers: K 6.71 GB at the same 351,850 tokens."""
    case = CASES["S3"]
    spec = spec_from_config({
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 5120, "num_hidden_layers": 40,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 32768,
        "vocab_size": 131072, "max_position_embeddings": 131072, "torch_dtype": "float16",
    })
    cost = cost_model(spec)
    plan = make_plan(cost, [Device("A100-80GB", 81920 * MiB)] * 4, "remainder-first",
                     engine=EngineModel(spec, 1, EngineSettings("sglang", 0.8)))
    tokens = case["reported"]["kv_tokens"]
    for stage in plan.stages:
        assert stage.num_layers == 10
        assert within(tokens * stage.kv_bytes_per_token / 2 / GiB, 6.71)
    whole = tokens * spec.num_layers * kv_bytes_per_token(spec) / 2 / GiB
    assert within(whole, case["reported"]["k_gib"])  # what the buggy build allocated on every rank


# ---------------------------------------------------------------------------------------------
# SGLang's default mem_fraction_static, by hand from server_args.py's rule


@pytest.mark.parametrize("gpu_mib, tp, pp, expected", [
    (24564, 1, 1, round((24564 - (512 + 2048 * 1.5 + 24 * 2 + 128)) / 24564, 3)),  # RTX 4090: 0.847
    (46068, 1, 1, round((46068 - (512 + 4096 * 1.5 + 32 * 2 + 128)) / 46068, 3)),  # L40S
    (81559, 1, 2, round((81559 - (512 + 8192 * 1.5 + 256 * 2 + 256)) / 81559, 3)),  # H100 PP2
    (81559, 8, 1, round((81559 - (512 + 8192 * 1.5 + 512 * 2 + 1024)) / 81559, 3)),  # H100 TP8
    (143771, 1, 1, round((143771 - (512 + 8192 * 1.5 + 256 * 2 + 128)) / 143771, 3)),  # H200 TP1
    (183359, 8, 1, round((183359 - (512 + 16384 * 1.5 + 512 * 2 + 1024)) / 183359, 3)),  # B200
])
def test_sglang_default_fraction(gpu_mib, tp, pp, expected):
    assert sglang_defaults(gpu_mib, tp, pp).mem_fraction_static == expected
    assert sglang_defaults(24564, 1, 1).mem_fraction_static == 0.847


def test_sglang_default_fraction_has_a_10_gib_floor_on_big_gpus():
    # 512 + 2048 x 1.5 + 256 x 2 + 128 = 4224 MiB, raised to 10 GiB on a GPU over 60 GiB
    assert sglang_defaults(81559, 1, 1, chunked_prefill_size=2048).mem_fraction_static == round((81559 - 10240) / 81559, 3)


def test_sglang_flags_change_the_default_fraction():
    base = sglang_defaults(81559, 1, 1)
    smaller = sglang_defaults(81559, 1, 1, chunked_prefill_size=16384, cuda_graph_max_bs=512)
    assert (base.chunked_prefill_size, base.cuda_graph_max_bs) == (8192, 256)
    assert smaller.mem_fraction_static < base.mem_fraction_static


# ---------------------------------------------------------------------------------------------
# Overheads: per stage, logits on the last, --reserve overrides


def test_vllm_logits_only_on_the_last_stage_and_tp_buffers():
    spec = load_spec("llama-3.1-8b")
    devices = resolve_devices("H100", None, 4)
    model = EngineModel(spec, 1, EngineSettings("vllm"))
    stages = model.overheads(devices, 0.9, 2.0)
    assert [s.logits > 0 for s in stages] == [False, False, False, True]
    assert stages[0].activation == stages[3].activation > 0
    tp2 = EngineModel(spec, 2, EngineSettings("vllm")).overheads(devices[:1], 0.9, 2.0)[0]
    assert tp2.communicator > stages[0].communicator  # NCCL / custom all-reduce buffers with TP
    assert tp2.activation < stages[0].activation  # MLP and attention activations split over TP


def test_reserve_replaces_the_modelled_overhead():
    spec = load_spec("llama-3.1-8b")
    cost = cost_model(spec)
    devices = resolve_devices("H100", None, 2)
    for engine in ("vllm", "sglang"):
        plan = make_plan(cost, devices, "vllm", engine=EngineModel(spec, 1, EngineSettings(engine, 0.9, reserve_gib=5.0)))
        if engine == "vllm":
            assert plan.stages[0].usable_bytes == int(visible_bytes(devices[0]) * 0.9) - 5 * GiB
        else:
            free = visible_bytes(devices[0]) - 5 * GiB
            assert plan.stages[0].usable_bytes == visible_bytes(devices[0]) - int(free * 0.1) - 5 * GiB


def test_vllm_blocks_round_tokens():
    spec = load_spec("llama-3.1-8b")
    cost = cost_model(spec)
    devices = resolve_devices("H100", None, 1)
    for block in (16, 128):
        plan = make_plan(cost, devices, "vllm", engine=EngineModel(spec, 1, EngineSettings("vllm", page_size=block)))
        assert plan.max_total_num_tokens % block == 0


def test_engine_settings_are_validated():
    with pytest.raises(UserError, match="unknown engine 'tgi'"):
        EngineSettings("tgi")
    with pytest.raises(UserError, match="must be in"):
        EngineSettings("vllm", 1.5)
    with pytest.raises(UserError, match="--page-size"):
        EngineSettings("sglang", page_size=0)


# ---------------------------------------------------------------------------------------------
# Hybrid attention: vLLM's KV groups and SGLang's SWA pool, by hand


def vllm_cell_by_hand(kinds: list[str], kv: int) -> int:
    """vllm/v1/core/kv_cache_utils.py: group size = the smaller type count (the larger one when it
    is under 1.25x the smaller), ceil(count / group size) groups per type; a token costs one page
    slot in every group, and each group has group-size layers."""
    counts = [kinds.count(k) for k in ("full", "sliding") if kinds.count(k)]
    if len(counts) == 1:
        return len(kinds) * kv
    low, high = min(counts), max(counts)
    group = high if high < 1.25 * low else low
    return sum(math.ceil(n / group) for n in counts) * group * kv


@pytest.mark.parametrize("kinds, expected_layers", [
    (["sliding", "full"] * 12, 24),  # gpt-oss-20b: two groups of 12
    (["sliding", "full"] * 6 + ["sliding"], 14),  # 7 sliding + 6 full: group 7, one padding layer
    (["full"] * 5 + ["sliding"] * 3, 9),  # group 3: ceil(5/3) + 1 = 3 groups
    ((["sliding"] * 5 + ["full"]) * 10 + ["sliding"] * 2, 70),  # Gemma-3-27B: 10 full, 52 sliding
])
def test_vllm_hybrid_groups(kinds, expected_layers):
    problem = SplitProblem((1,) * len(kinds), (10**9,), (0,), 100, layer_attention=tuple(kinds), kv_allocator="vllm-hybrid")
    assert problem.stage_kv_cell(0, len(kinds)) == expected_layers * 100 == vllm_cell_by_hand(kinds, 100)


def test_gemma3_layer_types_in_vllm():
    spec = load_spec("gemma-3-27b")
    assert [i for i, t in enumerate(spec.layer_types) if t == "full_attention"] == list(range(5, 62, 6))
    plan = make_plan(cost_model(spec, tp=2), resolve_devices("H100", None, 1), "vllm",
                     engine=EngineModel(spec, 2, EngineSettings("vllm")))
    assert plan.stages[0].kv_bytes_per_token == 70 * kv_bytes_per_token(spec, tp=2)


def test_sglang_swa_pool_follows_model_runner():
    """model_runner.py set_num_token_hybrid: tokens over all local layers, then
    full = int(tokens x layers / (ratio x swa_layers + full_layers)), rounded to the page."""
    spec = load_spec("gpt-oss-120b")
    cost = cost_model(spec)
    plan = make_plan(cost, resolve_devices("H200", None, 1), "vllm", engine=EngineModel(spec, 1, EngineSettings("sglang")))
    (stage,) = plan.stages
    rest = stage.usable_bytes - stage.weight_bytes
    kv = cost.kv_bytes_per_token_per_layer
    all_layer_tokens = rest // (kv * 36)
    by_hand = int(all_layer_tokens * 36 / (0.8 * 18 + 18))
    assert abs(plan.max_total_num_tokens - by_hand) <= 2
    uniform = rest // (kv * 36)
    assert plan.max_total_num_tokens > 1.1 * uniform  # the windowed layers' pool is smaller


def brute_capacity(problem: SplitProblem, partition) -> int:
    """Capacity of a partition written out independently: per stage its layers' kinds, the
    engine's cell by hand, floor to pages; SGLang divides every rank by the largest cell."""
    kinds = list(problem.layer_attention)
    cells, free, start = [], [], 0
    for s, n in enumerate(partition):
        layers = kinds[start:start + n]
        if problem.kv_allocator == "vllm-hybrid":
            cell = vllm_cell_by_hand(layers, problem.kv_bytes_per_token_per_layer)
        elif problem.kv_allocator == "sglang-swa" and "full" in layers and "sliding" in layers:
            cell = problem.kv_bytes_per_token_per_layer * (layers.count("full") + Fraction(4, 5) * layers.count("sliding"))
        else:
            cell = n * problem.kv_bytes_per_token_per_layer
        cells.append(cell)
        extra = problem.stage_extra_bytes[s]
        free.append(problem.usable_bytes[s] - sum(problem.layer_weight_bytes[start:start + n]) - extra)
        start += n
    if problem.target == "sglang":
        cells = [max(cells)] * len(cells)
    page = problem.page_size
    return min(max(0, int(f // c)) // page * page for f, c in zip(free, cells))


@pytest.mark.parametrize("seed", range(300))
def test_max_kv_is_optimal_for_hybrid_allocators(seed):
    rng = random.Random(seed)
    layers = rng.randint(2, 9)
    stages = rng.randint(1, min(4, layers))
    kinds = tuple(rng.choice(("full", "sliding")) for _ in range(layers))
    allocator, target = rng.choice([("vllm-hybrid", "pipesplit"), ("sglang-swa", "sglang"), ("sglang-swa", "pipesplit")])
    weights = tuple(rng.randint(0, 40) for _ in range(layers))
    extras = tuple(rng.randint(0, 40) for _ in range(stages))
    usable = tuple(rng.randint(60, 400) for _ in range(stages))
    problem = SplitProblem(weights, usable, extras, rng.randint(1, 3), target, layer_attention=kinds,
                           kv_allocator=allocator, page_size=rng.choice((1, 1, 2, 4)))
    best = max(brute_capacity(problem, p) for p in compositions(layers, stages))
    got = max_kv(layers, stages, problem)
    assert brute_capacity(problem, got) == best
    assert evaluate(problem, got).max_total_num_tokens == best


# ---------------------------------------------------------------------------------------------
# The CLI: --engine, the engines' flags, launch lines, --target as an alias


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_vllm_launch_line(capsys):
    code, out, _ = run(capsys, "plan", "llama-3.1-8b", "--pp", "2", "--gpu", "H100", "--engine", "vllm",
                       "--gpu-memory-utilization", "0.95", "--max-num-batched-tokens", "4096")
    assert code == 0
    launch = out.strip().splitlines()[-1]
    assert launch.startswith("VLLM_PP_LAYER_PARTITION=16,16 vllm serve meta-llama/Llama-3.1-8B ")
    assert "--pipeline-parallel-size 2" in launch and "--gpu-memory-utilization 0.95" in launch
    assert "--max-num-batched-tokens 4096" in launch


def test_sglang_launch_line_and_json(capsys):
    code, out, _ = run(capsys, "plan", "llama-3.1-70b-instruct", "--pp", "2", "--tp", "4", "--gpu", "H100",
                       "--engine", "sglang", "--json")
    assert code == 0
    doc = json.loads(out)
    fraction = sglang_defaults(81559, 4, 2).mem_fraction_static
    assert doc["engine"] == "sglang" and doc["mem_fraction"] == fraction
    (plan,) = doc["plans"]
    assert doc["launch"] == (f"SGLANG_PP_LAYER_PARTITION={','.join(map(str, plan['partition']))} python -m "
                             f"sglang.launch_server --model-path meta-llama/Llama-3.1-70B-Instruct --tp-size 4 --pp-size 2 "
                             f"--mem-fraction-static {fraction:g}")
    for stage in plan["stages"]:
        assert stage["usable_bytes"] + stage["overhead_bytes"] == stage["capacity_bytes"]
        assert stage["kv_bytes"] <= stage["usable_bytes"] - stage["weight_bytes"]


def test_target_is_a_deprecated_alias(capsys):
    code, out, err = run(capsys, "plan", "llama-3.1-8b", "--pp", "2", "--gpu", "H100", "--target", "sglang", "--json")
    assert code == 0 and "deprecated" in err and "--engine" in err
    code, same, _ = run(capsys, "plan", "llama-3.1-8b", "--pp", "2", "--gpu", "H100", "--engine", "sglang", "--json")
    assert json.loads(out)["plans"] == json.loads(same)["plans"]


def test_pipesplit_engine_is_unchanged(capsys):
    """--engine pipesplit is the old default rule: capacity x --mem-fraction - --reserve."""
    code, out, _ = run(capsys, "plan", "llama-3.1-8b", "--pp", "2", "--gpu", "H100", "--engine", "pipesplit", "--json")
    stage = json.loads(out)["plans"][0]["stages"][0]
    assert code == 0 and stage["usable_bytes"] == int(81559 * MiB * 0.9) - 2 * GiB


@pytest.mark.parametrize("argv, message", [
    (["--engine", "sglang", "--gpu-memory-utilization", "0.9"], "--gpu-memory-utilization applies to --engine vllm"),
    (["--engine", "vllm", "--mem-fraction-static", "0.9"], "--mem-fraction-static applies to --engine sglang"),
    (["--page-size", "16"], "--page-size is an engine flag"),
    (["--engine", "vllm", "--cuda-graph-max-bs", "8"], "--cuda-graph-max-bs applies to --engine sglang"),
    (["--engine", "vllm", "--target", "sglang"], "disagree"),
    (["--engine", "vllm", "--mem-fraction", "0.8"], "give vllm's --gpu-memory-utilization"),
])
def test_engine_flag_errors(capsys, argv, message):
    code, out, err = run(capsys, "plan", "llama-3.1-8b", "--pp", "2", "--gpu", "H100", *argv)
    assert code == 2 and out == "" and message in err
    assert err.splitlines()[-1].startswith("pipesplit: error: ")


def test_max_model_len_warning(capsys):
    code, out, _ = run(capsys, "plan", "llama-3.1-70b-instruct", "--pp", "8", "--gpu", "L4", "--engine", "vllm",
                       "--max-model-len", "131072")
    assert code == 0 and "vLLM will refuse to start" in out and "--max-model-len" in out
