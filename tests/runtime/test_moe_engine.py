"""MoE and MLA models through the engine: stage processes on gloo, planner parity, CLI.

For every family the stages' measured weight bytes and KV capacity equal the planner's
prediction (runtime_plan, float32), MLA capacity included ((kv_lora_rank + qk_rope_head_dim) x 4
bytes per layer-token), and greedy outputs equal transformers'.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from pipesplit import LLM, SamplingParams
from pipesplit.planner.costs import kv_bytes_per_token
from pipesplit.planner.plan import window_pool_for
from pipesplit.planner.spec import load_spec
from pipesplit.runtime.plan_bridge import runtime_plan
from tests.runtime.test_engine import check_plan_against_brute_force
from tests.runtime.test_models import MAX_NEW, PROMPTS, hf_greedy

GiB = 1 << 30
BUDGET_GIB = 0.004


@pytest.mark.parametrize(
    "name,pp,partition,mtp",
    [
        ("mixtral", 2, None, False),
        ("qwen2_moe", 2, "1,3", False),
        ("deepseek_v2", 2, None, False),
        ("qwen3_moe", 2, "3,2", False),
        ("deepseek_v2_groups", 2, "1,3", False),
        ("deepseek_v3", 3, "2,1,2", True),  # the last stage also holds the MTP module (model.layers.5)
    ],
)
def test_weights_capacity_and_outputs_equal_the_prediction(tiny_moe_checkpoints, name, pp, partition, mtp):
    folder = str(tiny_moe_checkpoints[name])
    spec = load_spec(folder)
    # mixtral's sliding_window makes every layer windowed: the engine gives them its window pool
    window_pool = window_pool_for(spec, micro_batches=pp)
    predicted = runtime_plan(spec, pp, None, partition, "float32", (int(BUDGET_GIB * GiB),) * pp, mtp, window_pool)
    assert predicted.stages[-1].mtp == mtp
    with LLM(folder, pp=pp, partition=partition, mem_budget_gib=BUDGET_GIB, mtp=mtp, dtype="float32",
             log=False) as llm:
        if window_pool is None:  # windowed capacity: brute force in tests/planner/test_windows.py
            check_plan_against_brute_force(llm, folder, pp, partition, int(BUDGET_GIB * GiB), mtp)
        assert llm.max_total_num_tokens == predicted.max_total_num_tokens
        for stage, report in zip(predicted.stages, llm.stage_reports):
            assert report.param_bytes == stage.weight_bytes
            assert report.kv_tokens == stage.kv_tokens
        outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_NEW))
    assert [list(o.token_ids) for o in outputs] == hf_greedy(folder, PROMPTS, MAX_NEW)
    if spec.mla is not None:
        # the KV cache holds the compressed latent: capacity follows the MLA formula
        assert kv_bytes_per_token(spec, kv_dtype="float32") == (spec.mla.kv_lora_rank + spec.mla.qk_rope_head_dim) * 4
        stage = predicted.stages[0]
        layers = stage.layers[1] - stage.layers[0]
        per_token = layers * kv_bytes_per_token(spec, kv_dtype="float32")
        assert stage.kv_tokens == (stage.usable_bytes - stage.weight_bytes) // per_token


def test_generate_cli_runs_a_deepseek_checkpoint(tiny_moe_checkpoints):
    """`pipesplit generate <folder>` needs no model-specific flag for an MLA + MoE checkpoint."""
    folder = str(tiny_moe_checkpoints["deepseek_v3"])
    prompt = PROMPTS[0]
    run = subprocess.run(
        [sys.executable, "-m", "pipesplit", "generate", folder, "--prompt-ids", ",".join(map(str, prompt)),
         "--max-tokens", "6", "--mem-budget", "0.01", "--dtype", "float32", "--json"],
        capture_output=True, text=True, timeout=180,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["outputs"][0]["token_ids"] == hf_greedy(folder, [prompt], 6)[0]
    assert report["partition"] == [5] and report["stages"][0]["mtp"] is False
    assert report["max_total_num_tokens"] == report["stages"][0]["kv_tokens"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3"])
def test_cuda_stages_match_transformers(tiny_moe_checkpoints, name):
    from pipesplit.runtime.loader import resolve_model
    from tests.runtime.test_models import PipelineInOneProcess

    folder = tiny_moe_checkpoints[name]
    pipeline = PipelineInOneProcess(resolve_model(str(folder)), [2, 3], device="cuda")
    assert all(p.is_cuda for stage in pipeline.stages for p in stage.parameters())
    expected = hf_greedy(str(folder), PROMPTS, MAX_NEW)
    assert pipeline.generate(PROMPTS, MAX_NEW, chunk=6, start_steps=[0, 1, 3]) == expected
