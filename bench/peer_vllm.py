"""Run by vLLM's own venv (bench/peers.py), never by the project's: one offline throughput run.

argv[1]: a JSON job {model, prompts (token ids), outputs (tokens per request), dtype, pp,
max_model_len, out}. Writes {seconds, output_tokens, tokens_per_s, startup_s} to `out`.
"""

import json
import sys
import time


def main() -> int:
    job = json.loads(open(sys.argv[1]).read())
    started = time.perf_counter()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = {"distributed_executor_backend": "mp"} if job["pp"] > 1 else {}
    llm = LLM(model=job["model"], dtype=job["dtype"], pipeline_parallel_size=job["pp"],
              max_model_len=job["max_model_len"], seed=0, **kwargs)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in job["outputs"]]
    llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)  # warm-up
    startup = time.perf_counter() - started
    t0 = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    produced = sum(len(r.outputs[0].token_ids) for r in results)
    assert produced == sum(job["outputs"]), (produced, sum(job["outputs"]))
    with open(job["out"], "w") as f:
        json.dump({"seconds": seconds, "output_tokens": produced, "tokens_per_s": produced / seconds,
                   "startup_s": startup, "first_token_ids": [list(r.outputs[0].token_ids[:8]) for r in results[:4]]}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
