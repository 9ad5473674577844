"""Runs `pipesplit generate` at PP2 and at PP3 (partition 1,2,2) on a tiny random DeepSeek-V3
checkpoint (5 layers), N times each, and counts the exits that are not 0 (issue 14: SIGABRT at exit).

    python bench/exit_check.py --runs 50     # -> bench/results/exit_check.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = {"pp2": ["--pp", "2"], "pp3": ["--pp", "3", "--partition", "1,2,2"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="processes per case")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--out", default=str(ROOT / "bench/results/exit_check.json"))
    args = parser.parse_args()
    from tests.conftest import add_mtp_tensors, make_tiny_checkpoint

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_tiny_checkpoint("deepseek_v3", Path(tmp) / "deepseek_v3")
        add_mtp_tensors(folder)
        for case in args.cases.split(","):
            flags = CASES[case]
            codes, failures, started = collections.Counter(), [], time.perf_counter()
            for i in range(args.runs):
                run = subprocess.run(
                    [sys.executable, "-m", "pipesplit", "generate", str(folder), *flags, "--prompt-ids", "1,2,3,4",
                     "--max-tokens", "8", "--mem-budget", "0.02", "--json"],
                    capture_output=True, text=True, env=env, timeout=300,
                )
                codes[run.returncode] += 1
                if run.returncode != 0:
                    failures.append({"run": i, "code": run.returncode, "stderr_tail": run.stderr[-400:]})
            results[case] = {"flags": " ".join(flags), "runs": args.runs, "zero_exits": codes[0], "exit_codes": dict(codes),
                             "seconds": round(time.perf_counter() - started, 1), "failures": failures}
            print(f"{case}: {codes[0]}/{args.runs} zero exits {dict(codes)}", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all(r["zero_exits"] == r["runs"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
