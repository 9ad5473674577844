"""Sliding-window KV pool: capacity and decode throughput of a small random gpt-oss-shaped model.

The model: 8 layers alternating sliding (window 128) and full attention, attention sinks, 8
experts top-2 with the clamped SwiGLU, hidden 256, float32, built with transformers and saved to
a temporary folder. Capacity: the planner's max_total_num_tokens for one stage budget with the
window pool (what the runtime allocates) and with windowed layers charged a slot per token (the
measured capacity of the run must equal the first). Runs: (a) pipesplit PP1, (b) pipesplit PP2,
(c) transformers `generate`, all requests in one batch; prompts longer than the window, EOS
ignored, one thread per process. One run, JSON out plus a Markdown table.

    .venv/bin/python bench/window.py            # 8 requests, 1024-token prompts, 64 output tokens
    .venv/bin/python bench/window.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from moe import run_transformers, workload  # noqa: E402  (bench/moe.py: the same vocabulary size)

from pipesplit import LLM, SamplingParams  # noqa: E402
from pipesplit.planner.plan import window_pool_for  # noqa: E402
from pipesplit.planner.spec import load_spec  # noqa: E402
from pipesplit.runtime.plan_bridge import runtime_plan  # noqa: E402

MODEL = dict(
    vocab_size=8192, hidden_size=256, intermediate_size=256, num_hidden_layers=8, num_attention_heads=8,
    num_key_value_heads=2, head_dim=32, num_local_experts=8, num_experts_per_tok=2, sliding_window=128,
    max_position_embeddings=4096, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)
BUDGET_GIB = 0.25
LIMITS = dict(max_running_requests=64, max_batch_tokens=2048)


def make_model(folder: Path, seed: int = 0) -> Path:
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers.GptOssConfig(**MODEL), dtype=torch.float32)
    model.save_pretrained(folder)
    return folder


def capacity(folder: Path, pp: int) -> dict:
    spec = load_spec(str(folder))
    budgets = (int(BUDGET_GIB * (1 << 30)),) * pp
    pool = window_pool_for(spec, LIMITS["max_running_requests"], LIMITS["max_batch_tokens"], pp)
    pooled = runtime_plan(spec, pp, None, None, "float32", budgets, window_pool=pool)
    charged = runtime_plan(spec, pp, None, None, "float32", budgets)
    return {"budget_gib_per_stage": BUDGET_GIB, "window_pool_slots": pooled.window_slots,
            "max_total_num_tokens_window_pool": pooled.max_total_num_tokens,
            "max_total_num_tokens_full_charge": charged.max_total_num_tokens,
            "gain": pooled.max_total_num_tokens / charged.max_total_num_tokens}


def run_pipesplit(folder: Path, prompts, output_len: int, pp: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    with LLM(str(folder), pp=pp, threads=1, mem_budget_gib=BUDGET_GIB, log=False, **LIMITS) as llm:
        llm.generate([prompts[0][:8]], SamplingParams(temperature=0, max_tokens=2))  # warm-up
        started = time.perf_counter()
        results = llm.generate(prompts, params)
        elapsed = time.perf_counter() - started
        measured = {"max_total_num_tokens": llm.max_total_num_tokens, "window_slots": llm.engine.window_slots}
    tokens = [list(r.token_ids) for r in results]
    produced = sum(map(len, tokens))
    return {"seconds": elapsed, "output_tokens": produced, "tokens_per_s": produced / elapsed, **measured,
            "token_ids": tokens}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 requests, 200-token prompts, 8 tokens")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "window.json"))
    args = parser.parse_args()
    if args.quick:
        args.requests, args.prompt_len, args.output_len = 2, 200, 8
    prompts = workload(args.requests, args.prompt_len, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_model(Path(tmp) / "gpt-oss-tiny", args.seed)
        caps = {f"pp{pp}": capacity(folder, pp) for pp in (1, 2)}
        runs = {
            "a_pipesplit_pp1": run_pipesplit(folder, prompts, args.output_len, 1),
            "b_pipesplit_pp2": run_pipesplit(folder, prompts, args.output_len, 2),
            "c_transformers_generate": run_transformers(folder, prompts, args.output_len, threads=1),
        }
    for name, pp in (("a_pipesplit_pp1", "pp1"), ("b_pipesplit_pp2", "pp2")):
        assert runs[name]["max_total_num_tokens"] == caps[pp]["max_total_num_tokens_window_pool"]
    reference = runs["c_transformers_generate"]["token_ids"]
    for run in runs.values():
        run["requests_identical_to_transformers"] = sum(a == b for a, b in zip(run.pop("token_ids"), reference))
    result = {
        "workload": {"requests": args.requests, "prompt_tokens": args.prompt_len, "output_tokens": args.output_len,
                     "seed": args.seed, "dtype": "float32", "ignore_eos": True, **LIMITS},
        "model": {"type": "gpt_oss (random weights)", **{k: v for k, v in MODEL.items() if v is not None}},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "capacity": caps,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| pp | window pool slots | max_total_num_tokens (window pool) | (full charge) | gain |")
    print("|---|---|---|---|---|")
    for pp, c in caps.items():
        print(f"| {pp} | {c['window_pool_slots']} | {c['max_total_num_tokens_window_pool']:,} | "
              f"{c['max_total_num_tokens_full_charge']:,} | {c['gain']:.2f}x |")
    print(f"\n{args.requests} requests x {args.output_len} output tokens (prompt {args.prompt_len}), float32, "
          "1 thread per process\n")
    print("| run | output tok/s | seconds | requests identical to HF |")
    print("|---|---|---|---|")
    for name, run in runs.items():
        print(f"| {name} | {run['tokens_per_s']:.1f} | {run['seconds']:.2f} "
              f"| {run['requests_identical_to_transformers']}/{args.requests} |")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
