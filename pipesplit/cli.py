"""Command line: parses arguments and hands them to the module that does the work."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipesplit.errors import UserError
from pipesplit.planner.plan import DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_RUNNING_REQUESTS
from pipesplit.server.limits import DEFAULT_MAX_REQUEST_BYTES, UNHEALTHY_SECONDS


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="config.json, a folder holding one, a built-in name (see `pipesplit models`) "
                   "or a Hugging Face id such as Qwen/Qwen3-32B (config.json from the local HF cache)")
    p.add_argument("--pp", type=int, required=True, help="pipeline stages")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per stage (costs are per rank)")
    p.add_argument("--gpu", help="GPU name for every stage, or one per stage: H100,H100,A100-40GB")
    p.add_argument("--gpu-mem", help="custom device memory in GiB, one for all or one per stage: 80,80,40")
    p.add_argument("--mem-fraction", type=float, default=None,
                   help="--engine pipesplit: share of device memory pipesplit may use (default 0.9)")
    p.add_argument("--reserve", type=float, default=None,
                   help="GiB per device for everything but weights and KV: replaces the engine's modelled overhead "
                   "(default 2 for --engine pipesplit)")
    p.add_argument("--kv-dtype", "--kv-cache-dtype", dest="kv_dtype", default="auto",
                   help="auto|float32|bfloat16|float16|fp8 (auto: the checkpoint's unquantized dtype)")
    p.add_argument("--engine", default=None, help="whose capacity to predict: pipesplit (default), sglang or vllm")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, help="vllm: its flag (default 0.9)")
    p.add_argument("--mem-fraction-static", type=float, default=None,
                   help="sglang: its flag (default: SGLang's heuristic on GPU memory and TP x PP)")
    p.add_argument("--max-num-batched-tokens", "--chunked-prefill-size", dest="max_num_batched_tokens", type=int,
                   default=None, help="vllm --max-num-batched-tokens / sglang --chunked-prefill-size (engine default)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="vllm: its flag (default 1024 on >= 70 GiB GPUs, else 256)")
    p.add_argument("--max-model-len", "--context-length", dest="max_model_len", type=int, default=None,
                   help="longest request (default: the model's max_position_embeddings)")
    p.add_argument("--page-size", "--block-size", dest="page_size", type=int, default=None,
                   help="sglang --page-size (default 1) / vllm --block-size (default 16)")
    p.add_argument("--cuda-graph-max-bs", type=int, default=None, help="sglang: its flag (enters the default fraction)")
    p.add_argument("--mtp", action="store_true", help="hold the multi-token-prediction module on the last stage")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--strategy", help="partition strategy (default max-kv); see --compare for all")
    group.add_argument("--partition", help="explicit layers per stage, e.g. 8,8,8,8,8,7,7,7")
    p.add_argument("--target", default=None, help=argparse.SUPPRESS)  # deprecated alias of --engine
    p.add_argument("--reorder", action="store_true", help="also search the order of mixed devices along the pipeline")
    p.add_argument("--compare", action="store_true", help="show every strategy side by side")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--env", choices=["sglang", "vllm"], help="print the env var that makes that engine use the partition")
    p.add_argument("--offline", action="store_true", help="never download a Hub config.json (also HF_HUB_OFFLINE=1)")
    p.add_argument("--objective", default=None,
                   help="max-kv (default), max-throughput or min-ttft: the best split by simulated value "
                   "(workload flags below; --chunked-prefill-size is the simulated scheduler's chunk)")
    from pipesplit.planner.simreport import add_workload_args

    add_workload_args(p, chunk_flag=False)


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (processes)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--strategy", help="partition strategy (default max-kv)")
    group.add_argument("--partition", help="explicit layers per stage, e.g. 10,10,10")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto (default): bfloat16 on CPUs with native bf16 (avx512_bf16/amx_bf16), else float32; "
                        "on CUDA the checkpoint's dtype")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--mem-budget", type=float, default=None, help="CPU: GiB per stage for weights + KV (default from available RAM)")
    p.add_argument("--mem-fraction", type=float, default=0.9, help="CUDA: share of device memory to use")
    p.add_argument("--mtp", action="store_true", help="load the MTP module on the last stage (memory accounting only)")
    p.add_argument("--micro-batches", type=int, default=None, help="micro-batches in flight (default: pp)")
    p.add_argument("--max-batch-tokens", type=int, default=DEFAULT_MAX_BATCH_TOKENS, help="token budget of one micro-batch")
    p.add_argument("--max-running-requests", type=int, default=DEFAULT_MAX_RUNNING_REQUESTS, help="requests decoding at once")
    p.add_argument("--chunked-prefill-size", type=int, default=512, help="longest prefill chunk of one request per step")
    p.add_argument("--threads", type=int, default=None, help="torch threads per stage (CPU)")
    p.add_argument("--disable-prefix-cache", dest="prefix_cache", action="store_false",
                   help="do not reuse the KV of shared prompt prefixes (on by default)")
    p.add_argument("--nnodes", type=int, default=None, help=argparse.SUPPRESS)


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 means off")
    p.add_argument("--seed", type=int, default=None)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="pipesplit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    _add_plan_args(sub.add_parser("plan", help="compute per-stage memory, KV capacity and the best partition"))
    models = sub.add_parser("models", help="list the built-in models")
    models.add_argument("--json", action="store_true")
    gpus = sub.add_parser("gpus", help="list the GPU catalog")
    gpus.add_argument("--json", action="store_true")

    sim = sub.add_parser("simulate", help="simulate the pipeline's scheduler: throughput, TTFT, TPOT, bubbles")
    sim.add_argument("model", help="config.json, a folder holding one, or a built-in name")
    sim.add_argument("--pp", type=int, required=True, help="pipeline stages")
    group = sim.add_mutually_exclusive_group()
    group.add_argument("--strategy", help="partition strategy (default max-kv)")
    group.add_argument("--partition", help="explicit layers per stage, e.g. 6,24")
    sim.add_argument("--gpu", help="roofline costs of this catalog GPU (one, or one per stage)")
    sim.add_argument("--tp", type=int, default=1, help="roofline: tensor-parallel ranks per stage")
    sim.add_argument("--kv-dtype", default="auto", help="roofline: KV cache dtype (auto|bfloat16|fp8|...)")
    sim.add_argument("--mem-fraction", type=float, default=0.9, help="roofline: share of GPU memory used")
    sim.add_argument("--reserve", type=float, default=2.0, help="roofline: GiB per GPU kept for activations")
    sim.add_argument("--mem-budget", type=float, default=None, help="--profile: GiB per CPU stage (as the runtime)")
    sim.add_argument("--json", action="store_true")
    from pipesplit.planner.simreport import add_workload_args

    add_workload_args(sim)

    prof = sub.add_parser("profile", help="measure a model's step costs on this machine for `simulate --profile`")
    prof.add_argument("model", help="checkpoint folder, .gguf file or built-in name (e.g. smollm2)")
    prof.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    prof.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    prof.add_argument("--threads", type=int, default=None, help="torch threads (the runtime uses cores / pp)")
    prof.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    prof.add_argument("--calibrate", action="store_true",
                      help="also run the engine on a short workload and scale the pieces to its measured steps")
    prof.add_argument("--out", required=True, help="JSON file to write")

    gen = sub.add_parser("generate", help="run a model as a pipeline and generate text")
    gen.add_argument("model", help="checkpoint folder, .gguf file or built-in name (e.g. smollm2)")
    gen.add_argument("prompt", nargs="*", help="one or more prompts")
    gen.add_argument("--prompt-ids", action="append", default=[], help="token ids, comma separated (repeatable)")
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--json", action="store_true")
    _add_runtime_args(gen)
    _add_sampling_args(gen)

    serve = sub.add_parser("serve", help="serve an OpenAI-compatible API")
    serve.add_argument("model", help="checkpoint folder, .gguf file or built-in name (e.g. smollm2)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=None, help="require this bearer token")
    serve.add_argument("--served-model-name", default=None)
    serve.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                       help=f"larger request bodies get 413 (default {DEFAULT_MAX_REQUEST_BYTES})")
    serve.add_argument("--max-prompt-tokens", type=int, default=None,
                       help="longer prompts get 400 (default: the context length minus one)")
    serve.add_argument("--unhealthy-seconds", type=float, default=UNHEALTHY_SECONDS,
                       help=f"after a stage dies, answer 503 this long before exiting (default {UNHEALTHY_SECONDS:g})")
    _add_runtime_args(serve)
    return parser, dict(sub.choices)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Options and prompts may come in any order (`generate MODEL --chat "prompt"`)."""
    parser, commands = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in commands:
        args = commands[argv[0]].parse_intermixed_args(argv[1:])
        args.command = argv[0]
        return args
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "simulate":
            from pipesplit.planner.simreport import simulate_command

            return simulate_command(args)
        if args.command == "profile":
            from pipesplit.runtime.profile import profile_command

            return profile_command(args)
        if args.command in ("plan", "models", "gpus"):
            from pipesplit.planner import report

            return {"plan": report.plan_command, "models": report.models_command, "gpus": report.gpus_command}[args.command](args)
        if args.command == "generate":
            from pipesplit.generate import generate_command

            return generate_command(args)
        from pipesplit.server.app import serve_command

        return serve_command(args)
    except UserError as exc:
        print(f"pipesplit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
