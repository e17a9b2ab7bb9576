#!/usr/bin/env bash
# One call on a lent GPU (about 6 minutes, at most ~8.5): GPU tests, kernel benchmarks, end-to-end
# throughput against transformers; a short table last. Logs go to $OUT (the device tool's output
# folder, at most 8 files come back: this writes 7) or bench/out.
#   bash bench/gpu_check.sh          (device tool: timeout_s 560)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv

# Each hypothesis example may compile new kernel variants on the GPU: fewer examples than on CPU.
HYPOTHESIS_PROFILE=gpu timeout 150 "$PY" -m pytest -q -m gpu tests > "$OUT/gpu_tests.log" 2>&1
tests_rc=$?

timeout 110 "$PY" bench/kernels.py --json "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
kernels_rc=$?

# The issue-3 target: Llama-3-8B shapes, 128 x 512 in / 256 out, 32 GiB cap, against transformers.
timeout 170 "$PY" bench/throughput.py --model llama-3-8b --workload fixed --num-prompts 128 --input-len 512 \
    --output-len 256 --memory-cap-gib 32 --peer-batch 128 --json "$OUT/throughput_8b.json" \
    > "$OUT/throughput_8b.log" 2>&1
e2e_rc=$?

# Mixed against separate prefill on ShareGPT-like lengths (PipeMax only).
timeout 70 "$PY" bench/throughput.py --model llama-3.2-1b --workload sharegpt --num-prompts 256 \
    --prefill-mode both --skip-peer --json "$OUT/throughput_1b.json" > "$OUT/throughput_1b.log" 2>&1
modes_rc=$?

echo
echo "== GPU tests: exit $tests_rc"; tail -n 3 "$OUT/gpu_tests.log"
echo "== kernels: exit $kernels_rc"; tail -n 22 "$OUT/kernels.log"
echo "== throughput 8B vs transformers: exit $e2e_rc"; tail -n 6 "$OUT/throughput_8b.log"
echo "== prefill modes 1B: exit $modes_rc"; tail -n 5 "$OUT/throughput_1b.log"
