#!/usr/bin/env bash
# Second device call (issue 20, per-stage KV residency), after bench/gpu_check.sh:
#   bash bench/gpu_check_offload.sh     (device tool: timeout_s 560)
# 1. The staging ring's GPU tests: copies beside compute, a slot refilled only after its last
#    compute and write-through (a slow kernel injected), stream priorities.
# 2. Decode-heavy work where KV binds: Llama-3-8B shapes, 64 x 512 in / 512 out, a 24 GiB cap
#    (about 6 GiB of KV for ~65k tokens of demand), four micro-batches, P = 2 and P = 4 stages in
#    process on this one GPU: offload off, auto (twice: the first run fits and saves the step
#    costs auto sizes its ring from) and force. The figures: throughput against off, the
#    sequences served at once, PCIe GB/s, the share of copy time hidden.
# 3. One device, one micro-batch: auto must decline (no ring) and stay within 2% of off.
# Logs go to $OUT (the device tool's output folder) or bench/out; a short table last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
export PIPEMAX_PROFILES="$OUT/profiles"  # a fresh profile folder: auto's first run fits, its second uses the fit

HYPOTHESIS_PROFILE=gpu timeout 60 "$PY" -m pytest -q -m gpu tests/worker/test_offload_gpu.py > "$OUT/offload_gpu_tests.log" 2>&1
tests_rc=$?

timeout 300 "$PY" bench/bench_throughput.py --model llama-3-8b --workload fixed --num-prompts 64 --input-len 512 \
    --output-len 512 --memory-cap-gib 24 --skip-peer --pipeline-parallel 2,4 --micro-batches 4 \
    --offload off,auto,auto,force --host-memory-gib 48 --json "$OUT/residency_8b.json" > "$OUT/residency_8b.log" 2>&1
residency_rc=$?

timeout 150 "$PY" bench/bench_throughput.py --model llama-3-8b --workload fixed --num-prompts 64 --input-len 512 \
    --output-len 512 --memory-cap-gib 24 --skip-peer --micro-batches 1 --offload off,auto,auto \
    --host-memory-gib 48 --json "$OUT/residency_8b_p1.json" > "$OUT/residency_8b_p1.log" 2>&1
single_rc=$?

echo
echo "== staging ring GPU tests: exit $tests_rc"; tail -n 3 "$OUT/offload_gpu_tests.log"
echo "== decode-heavy 8B, 24 GiB, M = 4, P = 2 and 4: off / auto (seeding) / auto / force: exit $residency_rc"
tail -n 10 "$OUT/residency_8b.log"
echo "== one device, M = 1: off / auto (seeding) / auto (must be >= 0.98x off): exit $single_rc"
tail -n 5 "$OUT/residency_8b_p1.log"
