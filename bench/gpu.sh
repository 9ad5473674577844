#!/usr/bin/env bash
# The GPU check in one call (under 8 minutes on one GPU): the GPU-marked tests, then the
# throughput bench on CUDA (pipesplit PP1, PP2 with both stages on GPU 0, against transformers),
# then one summary. Without a CUDA device it says so and dry-runs the same steps on CPU.
#
#     bench/gpu.sh            # PY=.venv/bin/python by default; REQUESTS=256 on CUDA
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-bench/results}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
started=$(date +%s)

if $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  DEVICE=cuda
  BENCH=(--device cuda --dtype bfloat16 --requests "${REQUESTS:-256}" --only pipesplit-pp1,pipesplit-pp2,transformers)
  $PY -c 'import torch; print(f"gpu.sh: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}")'
else
  DEVICE=cpu
  BENCH=(--device cpu --dtype bfloat16 --requests 8 --prompt-tokens 32,64 --output-tokens 8,16
         --only pipesplit-pp1,pipesplit-pp2,transformers)
  echo "gpu.sh: NO CUDA DEVICE: torch.cuda.is_available() is False; dry run on CPU (the GPU tests will be skipped)"
fi

timeout 300 $PY -m pytest -q -ra -m gpu tests > "$OUT/gpu_tests.log" 2>&1
tests_rc=$?
timeout 240 $PY bench/throughput.py "${BENCH[@]}" --out "$OUT/throughput_$DEVICE.json" > "$OUT/gpu_bench.log" 2>&1
bench_rc=$?

echo
echo "== gpu.sh summary ($DEVICE, $(( $(date +%s) - started )) s) =="
echo "tests (-m gpu): exit $tests_rc: $(tail -n 1 "$OUT/gpu_tests.log")"
grep -E "^(FAILED|ERROR|SKIPPED)" "$OUT/gpu_tests.log" | head -n 10
if [ $bench_rc -eq 0 ]; then
  sed -n '/^| engine/,$p' "$OUT/gpu_bench.log"
else
  echo "throughput bench: exit $bench_rc; last lines of $OUT/gpu_bench.log:"
  tail -n 15 "$OUT/gpu_bench.log"
fi
[ $tests_rc -eq 0 ] && [ $bench_rc -eq 0 ]
