"""Decode throughput of a small random DeepSeek-V3-shaped model (MLA + MoE), float32 on CPU.

The model: 8 layers (2 dense, 6 MoE with 16 routed experts, top-4 in 2 of 4 groups, 1 shared
expert, noaux_tc routing), MLA with q_lora, hidden 256; built with transformers and saved to a
temporary folder. Runs: (a) pipesplit PP1, (b) pipesplit PP2 (two stage processes, two
micro-batches in flight), (c) transformers `generate`, all requests in one batch; every process
runs --threads torch threads (default 1), so PP2 uses twice the cores of the others. Same requests
everywhere (equal prompt lengths, so transformers needs no padding), EOS ignored, only output
tokens counted. One run, JSON out plus a Markdown table.

    .venv/bin/python bench/moe.py            # 32 requests x 64 output tokens
    .venv/bin/python bench/moe.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from pipesplit import LLM, SamplingParams  # noqa: E402

MODEL = dict(
    vocab_size=8192, hidden_size=256, intermediate_size=768, moe_intermediate_size=128, num_hidden_layers=8,
    first_k_dense_replace=2, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=128, kv_lora_rank=64,
    qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, num_experts_per_tok=4,
    n_group=4, topk_group=2, n_shared_experts=1, norm_topk_prob=True, routed_scaling_factor=2.5,
    num_nextn_predict_layers=0, max_position_embeddings=4096, bos_token_id=None, eos_token_id=None,
    pad_token_id=None,
)


def make_model(folder: Path, seed: int = 0) -> Path:
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers.DeepseekV3Config(**MODEL), dtype=torch.float32)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.05)
    model.save_pretrained(folder)
    return folder


def workload(n: int, prompt_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(MODEL["vocab_size"]) for _ in range(prompt_len)] for _ in range(n)]


def run_pipesplit(folder: Path, prompts, output_len: int, pp: int, threads: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    with LLM(str(folder), pp=pp, threads=threads, mem_budget_gib=0.5, log=False) as llm:
        llm.generate([prompts[0][:8]], SamplingParams(temperature=0, max_tokens=2))  # warm-up
        started = time.perf_counter()
        results = llm.generate(prompts, params)
        elapsed = time.perf_counter() - started
        capacity = llm.max_total_num_tokens
        weights = [r.param_bytes for r in llm.stage_reports]
    tokens = [list(r.token_ids) for r in results]
    produced = sum(map(len, tokens))
    assert produced == len(prompts) * output_len, produced
    return {"seconds": elapsed, "output_tokens": produced, "tokens_per_s": produced / elapsed,
            "max_total_num_tokens": capacity, "stage_weight_bytes": weights, "threads_per_stage": threads,
            "token_ids": tokens}


def run_transformers(folder: Path, prompts, output_len: int, threads: int) -> dict:
    import transformers

    torch.set_num_threads(threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    with torch.inference_mode():
        model.generate(ids[:1, :8], attention_mask=torch.ones_like(ids[:1, :8]), max_new_tokens=2, do_sample=False,
                       pad_token_id=0)  # warm-up
        started = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=output_len,
                             min_new_tokens=output_len, do_sample=False, pad_token_id=0)
        elapsed = time.perf_counter() - started
    tokens = out[:, ids.shape[1]:].tolist()
    produced = sum(map(len, tokens))
    return {"seconds": elapsed, "output_tokens": produced, "tokens_per_s": produced / elapsed,
            "batch_size": len(prompts), "threads": threads, "token_ids": tokens}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (default 1: on shared cores OpenMP spin-waits cost 10x+)")
    parser.add_argument("--quick", action="store_true", help="4 requests x 8 tokens, to check the script runs")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "moe.json"))
    args = parser.parse_args()
    if args.quick:
        args.requests, args.output_len = 4, 8
    prompts = workload(args.requests, args.prompt_len, args.seed)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_model(Path(tmp) / "deepseek-v3-tiny", args.seed)
        runs = {
            "a_pipesplit_pp1": run_pipesplit(folder, prompts, args.output_len, 1, args.threads),
            "b_pipesplit_pp2": run_pipesplit(folder, prompts, args.output_len, 2, args.threads),
            "c_transformers_generate": run_transformers(folder, prompts, args.output_len, args.threads),
        }
    reference = runs["c_transformers_generate"]["token_ids"]
    for run in runs.values():
        tokens = run.pop("token_ids")
        # batched float32 can flip a near-tie, after which a sequence diverges: count exact matches
        run["requests_identical_to_transformers"] = sum(a == b for a, b in zip(tokens, reference))
    hf = runs["c_transformers_generate"]["tokens_per_s"]
    result = {
        "workload": {"requests": args.requests, "prompt_tokens": args.prompt_len, "output_tokens": args.output_len,
                     "seed": args.seed, "dtype": "float32", "ignore_eos": True},
        "model": {"type": "deepseek_v3 (random weights)", **{k: v for k, v in MODEL.items() if v is not None}},
        "machine": {"cpus": cores, "platform": platform.platform(), "torch": torch.__version__},
        "runs": runs,
        "speedup_over_transformers": {name: run["tokens_per_s"] / hf for name, run in runs.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.requests} requests x {args.output_len} output tokens (prompt {args.prompt_len}), float32, "
          f"{args.threads} thread(s) per process (PP2: two processes), {cores} CPU cores\n")
    print("| run | output tok/s | seconds | vs transformers | requests identical to HF |")
    print("|---|---|---|---|---|")
    for name, run in runs.items():
        print(f"| {name} | {run['tokens_per_s']:.1f} | {run['seconds']:.2f} | {run['tokens_per_s'] / hf:.2f}x "
              f"| {run['requests_identical_to_transformers']}/{args.requests} |")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
