"""KV capacity (max_total_num_tokens) of every partition strategy on real models and GPUs.

Cases with an engine predict what that engine reports (its memory model and defaults, see
pipesplit/planner/engines.py); the others use pipesplit's own rule (mem-fraction 0.9, reserve 2 GiB).
Writes bench/results/capacity.json and prints a Markdown table. Not a test: it asserts only the
claim the table makes, that max-kv is at least as good as every other strategy in every case.

    .venv/bin/python bench/capacity.py
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipesplit.planner.costs import cost_model
from pipesplit.planner.engines import EngineModel, EngineSettings
from pipesplit.planner.hardware import DEFAULT_RESERVE_GIB, resolve_devices
from pipesplit.planner.partition import STRATEGIES
from pipesplit.planner.plan import compare
from pipesplit.planner.spec import load_spec

RESULTS = Path(__file__).resolve().parent / "results" / "capacity.json"
MEM_FRACTION = 0.9


@dataclass(frozen=True)
class Case:
    model: str
    pp: int
    gpu: str
    tp: int = 1
    mtp: bool = False
    target: str = "pipesplit"
    reorder: bool = False
    engine: str = "pipesplit"

    @property
    def label(self) -> str:
        gpus = self.gpu if "," not in self.gpu else "+".join(_runs(self.gpu.split(",")))
        parts = [self.model, f"PP{self.pp}"] + ([f"TP{self.tp}"] if self.tp > 1 else []) + [gpus]
        parts += (["MTP"] if self.mtp else []) + ([f"target {self.target}"] if self.target != "pipesplit" else [])
        parts += ["reorder"] if self.reorder else []
        parts += [f"engine {self.engine}"] if self.engine != "pipesplit" else []
        return " ".join(parts)


def _runs(names: list[str]) -> list[str]:
    out: list[list] = []
    for name in names:
        if out and out[-1][1] == name:
            out[-1][0] += 1
        else:
            out.append([1, name])
    return [f"{n}x{name}" for n, name in out]


CASES = [
    Case("deepseek-v3", 8, "H200"),
    Case("deepseek-v3", 8, "B200"),
    Case("deepseek-v3", 8, "H200", mtp=True),
    Case("deepseek-v3", 8, "H200", target="sglang"),
    Case("deepseek-v3", 2, "H200", tp=8),
    Case("deepseek-v3", 4, "MI300X"),
    Case("llama-3.1-70b-instruct", 8, "L4"),
    Case("llama-3.1-70b-instruct", 4, "L40S", tp=2),
    Case("llama-3.1-70b-instruct", 4, "H100,H100,A100-40GB,A100-40GB"),
    Case("llama-3.1-70b-instruct", 4, "A100-40GB,H100,A100-40GB,H100", reorder=True),
    Case("llama-3.1-8b", 4, "RTX-4090"),
    Case("llama-3.1-8b", 2, "RTX-5070-Ti,RTX-5090"),
    Case("qwen3-235b-a22b-instruct-2507", 8, "H100"),
    Case("qwen3-235b-a22b-instruct-2507", 8, "H100", target="sglang"),
    Case("qwen3-235b-a22b-instruct-2507", 2, "H100", tp=4),
    Case("mixtral-8x7b-v0.1", 2, "H100"),
    Case("gpt-oss-120b", 2, "H100"),
    Case("gpt-oss-120b", 4, "L40S"),
    Case("qwen3-30b-a3b", 4, "RTX-4090"),
    Case("qwen3-30b-a3b", 4, "L4"),
    Case("llama-3.1-70b-instruct", 8, "L4", target="sglang"),
    Case("deepseek-v3", 8, "H200", engine="sglang"),
    Case("deepseek-v3", 8, "H200", engine="vllm"),
    Case("llama-3.1-70b-instruct", 8, "L4", engine="sglang"),
    Case("llama-3.1-70b-instruct", 8, "L4", engine="vllm"),
    Case("qwen3-32b", 2, "L40S", engine="vllm"),
    Case("llama-3.3-70b-instruct", 4, "H100,H100,A100-40GB,A100-40GB", engine="vllm"),
    Case("gpt-oss-120b", 2, "H100", engine="sglang"),
    Case("gpt-oss-120b", 2, "H100", engine="vllm"),
    Case("gpt-oss-120b", 8, "L40S", engine="sglang"),
    Case("gpt-oss-20b", 3, "L4", engine="vllm"),
    Case("gemma-3-27b", 4, "L4", engine="sglang"),
    Case("gemma-3-27b", 4, "L4", engine="vllm"),
    Case("glm-4.5", 4, "H200", tp=8, engine="sglang"),
]


def run_case(case: Case) -> dict:
    spec = load_spec(case.model)
    cost = cost_model(spec, tp=case.tp, mtp=case.mtp)
    devices = resolve_devices(case.gpu, None, case.pp)
    engine = EngineModel(spec, case.tp, EngineSettings(case.engine)) if case.engine != "pipesplit" else None
    start = time.perf_counter()
    plans = compare(cost, devices, case.target, case.reorder, MEM_FRACTION, DEFAULT_RESERVE_GIB, spec.name, engine=engine)
    seconds = time.perf_counter() - start
    by_name = {p.strategy: p for p in plans}
    best = by_name["max-kv"]
    for p in plans:
        assert best.max_total_num_tokens >= p.max_total_num_tokens, (case.label, p.strategy)
    return {
        "case": case.label,
        "model": case.model,
        "pp": case.pp,
        "tp": case.tp,
        "gpus": [st.gpu for st in best.stages],
        "mtp": case.mtp,
        "target": case.target,
        "engine": case.engine,
        "memory_fraction": best.memory_fraction,
        "reorder": case.reorder,
        "plan_seconds": round(seconds, 3),
        "strategies": {
            p.strategy: {
                "partition": list(p.partition),
                "gpus": [st.gpu for st in p.stages],
                "max_total_num_tokens": p.max_total_num_tokens,
                "fits": p.fits,
                "binding_stage": p.binding_stage,
                "max_kv_gain": round(best.max_total_num_tokens / p.max_total_num_tokens, 4) if p.fits else None,
            }
            for p in plans
        },
    }


def markdown(rows: list[dict]) -> str:
    names = list(STRATEGIES)
    header = ["case", *names, "max-kv partition"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["case"]]
        for name in names:
            s = row["strategies"][name]
            if not s["fits"]:
                cells.append("does not fit")
            elif name == "max-kv":
                cells.append(f"**{s['max_total_num_tokens']:,}**")
            else:
                cells.append(f"{s['max_total_num_tokens']:,} (x{s['max_kv_gain']:.3f})")
        best = row["strategies"]["max-kv"]
        order = f" on {','.join(best['gpus'])}" if row["reorder"] else ""
        cells.append(",".join(map(str, best["partition"])) + order)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    rows = [run_case(case) for case in CASES]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "description": "max_total_num_tokens per strategy; max_kv_gain = max-kv tokens / this strategy's tokens",
        "mem_fraction": MEM_FRACTION,
        "reserve_gib": DEFAULT_RESERVE_GIB,
        "python": platform.python_version(),
        "cases": rows,
    }
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"mem-fraction {MEM_FRACTION}, reserve {DEFAULT_RESERVE_GIB:g} GiB per device (engine cases: that engine's "
          "defaults); (xG) = max-kv's max_total_num_tokens / that strategy's\n")
    print(markdown(rows))
    print(f"\nwrote {RESULTS.relative_to(Path.cwd()) if RESULTS.is_relative_to(Path.cwd()) else RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
