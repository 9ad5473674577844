"""The CUDA path (NCCL between stages). Skipped where no GPU is present."""

from __future__ import annotations

import pytest
import torch

from pipesplit import LLM, SamplingParams
from tests.runtime.test_engine import hf_greedy

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_single_stage_on_cuda_matches_transformers(tiny_checkpoints):
    folder = str(tiny_checkpoints["llama"])
    with LLM(folder, pp=1, device="cuda", mem_fraction=0.2, log=False) as llm:
        out = llm.generate([[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=8))[0]
        assert llm.max_total_num_tokens > 0
    assert list(out.token_ids) == hf_greedy(folder, [[1, 2, 3, 4]], [8])[0]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL between stages needs two GPUs")
def test_two_stages_over_nccl_match_transformers(tiny_checkpoints):
    folder = str(tiny_checkpoints["qwen3"])
    prompts = [[5, 6, 7], [9, 9, 9, 9, 9]]
    with LLM(folder, pp=2, device="cuda", mem_fraction=0.2, log=False) as llm:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6))
    assert [list(o.token_ids) for o in outs] == hf_greedy(folder, prompts, [6, 6])


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() > 4, reason="the tiny model has too few layers for a stage per GPU plus one")
def test_stages_sharing_a_gpu_match_transformers(tiny_checkpoints):
    """More stages than GPUs: two stages on one device, talking over gloo through host memory."""
    folder = str(tiny_checkpoints["qwen3"])
    prompts = [[5, 6, 7], [9, 9, 9, 9, 9]]
    with LLM(folder, pp=torch.cuda.device_count() + 1, device="cuda", mem_fraction=0.2, log=False) as llm:
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=6))
    assert [list(o.token_ids) for o in outs] == hf_greedy(folder, prompts, [6, 6])
