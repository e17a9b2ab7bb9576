#!/usr/bin/env bash
# Issue 23 on a lent GPU (a call of its own: bash bench/gpu_check_fp8.sh, device tool timeout_s 560;
# the section timeouts add up to 450 s):
#   the fp8 KV kernels against their references (GPU-compiled: store, RoPE + store, attention,
#   copies), decode attention's HBM rate over an fp8 pool, fp8 KV accuracy on the bundled
#   SmolLM2-135M (real weights, bfloat16 model: teacher-forced agreement, KL, greedy matches), and
#   the headline: Llama-3-8B shapes, decode-heavy (512 in / 2,048 out), a 24 GiB cap, bf16 KV
#   against fp8 KV (the ratio, and each against its roofline). A short table last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.total --format=csv

HYPOTHESIS_PROFILE=gpu timeout 60 "$PY" -m pytest -q -m gpu tests/kernels/test_fp8_kv.py > "$OUT/fp8_tests.log" 2>&1
tests_rc=$?

timeout 60 "$PY" bench/bench_kernels.py --json "$OUT/kernels_fp8.json" > "$OUT/kernels_fp8.log" 2>&1
kernels_rc=$?

timeout 90 "$PY" bench/bench_fp8_accuracy.py --json "$OUT/fp8_accuracy.json" > "$OUT/fp8_accuracy.log" 2>&1
accuracy_rc=$?

timeout 240 "$PY" bench/bench_throughput.py --model llama-3-8b --workload decode-heavy --num-prompts 96 \
    --memory-cap-gib 24 --kv-cache-dtype auto,fp8 --skip-peer --json "$OUT/fp8_throughput_8b.json" \
    > "$OUT/fp8_throughput_8b.log" 2>&1
e2e_rc=$?

echo
echo "== fp8 kernels on the GPU: exit $tests_rc"; tail -n 3 "$OUT/fp8_tests.log"
echo "== decode attention, bf16 and fp8 pools: exit $kernels_rc"; grep "decode_attention.*B=128 ctx=\(2048\|8192\)" "$OUT/kernels_fp8.log"
echo "== fp8 accuracy, SmolLM2-135M: exit $accuracy_rc"; tail -n 5 "$OUT/fp8_accuracy.log"
echo "== 8B decode-heavy, 24 GiB cap, bf16 vs fp8 KV: exit $e2e_rc"; tail -n 6 "$OUT/fp8_throughput_8b.log"
