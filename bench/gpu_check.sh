#!/usr/bin/env bash
# One call on a lent GPU (about 7 minutes, at most ~9): GPU tests, kernel benchmarks, end-to-end
# throughput against transformers, pipeline stages and micro-batches; a short table last. Logs go
# to $OUT (the device tool's output folder, at most 8 files come back: this writes 8) or bench/out.
#   bash bench/gpu_check.sh          (device tool: timeout_s 560)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv

# Each hypothesis example may compile new kernel variants on the GPU: fewer examples than on CPU.
HYPOTHESIS_PROFILE=gpu timeout 120 "$PY" -m pytest -q -m gpu tests > "$OUT/gpu_tests.log" 2>&1
tests_rc=$?

timeout 100 "$PY" bench/kernels.py --json "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
kernels_rc=$?

# The issue-3 target: Llama-3-8B shapes, 128 x 512 in / 256 out, 32 GiB cap, against transformers.
timeout 150 "$PY" bench/throughput.py --model llama-3-8b --workload fixed --num-prompts 128 --input-len 512 \
    --output-len 256 --memory-cap-gib 32 --peer-batch 128 --json "$OUT/throughput_8b.json" \
    > "$OUT/throughput_8b.log" 2>&1
e2e_rc=$?

# Mixed against separate prefill on ShareGPT-like lengths (PipeMax only).
timeout 60 "$PY" bench/throughput.py --model llama-3.2-1b --workload sharegpt --num-prompts 256 \
    --prefill-mode both --skip-peer --json "$OUT/throughput_1b.json" > "$OUT/throughput_1b.log" 2>&1
modes_rc=$?

# Issue 7: the host off the critical path (P = 1, M = 1 against M = 2) and pipeline stages
# time-shared in process on this one GPU (P = 2 and 4 against P = 1), same 8B workload.
timeout 170 "$PY" bench/throughput.py --model llama-3-8b --workload fixed --num-prompts 128 --input-len 512 \
    --output-len 256 --memory-cap-gib 32 --skip-peer --pipeline-parallel 1,2,4 --micro-batches 1,2,3,5 \
    > "$OUT/pipeline_8b.log" 2>&1
pipeline_rc=$?

echo
echo "== GPU tests: exit $tests_rc"; tail -n 3 "$OUT/gpu_tests.log"
echo "== kernels: exit $kernels_rc"; tail -n 22 "$OUT/kernels.log"
echo "== throughput 8B vs transformers: exit $e2e_rc"; tail -n 6 "$OUT/throughput_8b.log"
echo "== prefill modes 1B: exit $modes_rc"; tail -n 5 "$OUT/throughput_1b.log"
echo "== pipeline 8B (in process, one GPU): exit $pipeline_rc"; tail -n 8 "$OUT/pipeline_8b.log"
