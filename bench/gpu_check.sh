#!/usr/bin/env bash
# One call on a lent GPU (well under ten minutes): GPU tests, then kernel benchmarks; a short table
# last. Full logs go to $OUT (the device tool's output folder) or bench/out.
#   bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

# Each hypothesis example may compile new kernel variants on the GPU: fewer examples than on CPU.
HYPOTHESIS_PROFILE=gpu timeout 240 python -m pytest -q -m gpu tests > "$OUT/gpu_tests.log" 2>&1
tests_rc=$?
tail -n 3 "$OUT/gpu_tests.log"

timeout 300 python bench/kernels.py --json "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
bench_rc=$?

echo
echo "== GPU tests: exit $tests_rc (log: $OUT/gpu_tests.log)"
echo "== kernel benchmark: exit $bench_rc (log: $OUT/kernels.log)"
tail -n 25 "$OUT/kernels.log"
