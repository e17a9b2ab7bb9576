#!/usr/bin/env bash
# First device call on a lent GPU (bash bench/gpu_check.sh, device tool timeout_s 560; the section
# timeouts add up to 440 s, the rest is start-up and slack):
#   GPU tests (kernels against their references, graphs, the fused layer's launch budget), kernel
#   benchmarks, the host's step build, then the headline: Llama-3-8B shapes, 128 x 512 in / 256
#   out, 32 GiB cap, against transformers (issue 22: the host one step ahead at M = 1, async
#   scheduling on and off; every kernel variant is warmed up before the timed run; rows print as
#   they finish), and prefix caching on and off. A short table last.
# Second call: bash bench/gpu_check_offload.sh (issue 20's per-stage KV residency).
# Third call: bash bench/gpu_check_peers.sh (LongBench offload, autotune + the simulator's
#   calibration, the peers on OPT-6.7B).
# Fourth call: bash bench/gpu_check_fp8.sh (issue 23: fp8 KV kernels, accuracy, the 8B decode-heavy
#   comparison at a 24 GiB cap).
# Logs go to $OUT (the device tool's output folder) or bench/out. (The P/M grid of issue 7 and the
# prefill modes were measured on an H100 and are in RESULTS.md; rerun them with bench/bench_throughput.py.)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.total,pcie.link.gen.max,pcie.link.width.max --format=csv

# Each hypothesis example may compile new kernel variants on the GPU: fewer examples than on CPU.
HYPOTHESIS_PROFILE=gpu timeout 80 "$PY" -m pytest -q -m gpu tests > "$OUT/gpu_tests.log" 2>&1
tests_rc=$?

timeout 70 "$PY" bench/bench_kernels.py --json "$OUT/kernels.json" > "$OUT/kernels.log" 2>&1
kernels_rc=$?

# Issue 7: the host's time to prepare a decode step, device-resident chunk tables against the rebuild.
timeout 20 "$PY" bench/bench_host_step.py > "$OUT/host_step_build.log" 2>&1
host_rc=$?

# The headline (issues 3, 22): Llama-3-8B shapes, 128 x 512 in / 256 out, 32 GiB cap, against
# transformers at batch 96 (128 does not fit the cap: its out-of-memory try is skipped). M = 1 with
# the host one step ahead (async scheduling) and without: how long the device waits for the host.
timeout 180 "$PY" bench/bench_throughput.py --model llama-3-8b --workload fixed --num-prompts 128 --input-len 512 \
    --output-len 256 --memory-cap-gib 32 --peer-batch 96 --micro-batches 1 --async-scheduling on,off \
    --json "$OUT/throughput_8b.json" > "$OUT/throughput_8b.log" 2>&1
e2e_rc=$?

# Issue 12: prefix caching on and off, Llama-3.2-1B shapes. Few-shot: a 1,500-token shared prefix
# before 64 different 100-token questions, 32 out (target >= 5x); the same lengths with no sharing
# (target: no slowdown, within noise).
timeout 40 "$PY" bench/bench_throughput.py --model llama-3.2-1b --workload fewshot --num-prompts 64 --shared-prefix-len 1500 \
    --input-len 100 --output-len 32 --prefix-caching on,off --skip-peer --json "$OUT/prefix_fewshot.json" \
    > "$OUT/prefix_fewshot.log" 2>&1
fewshot_rc=$?
timeout 30 "$PY" bench/bench_throughput.py --model llama-3.2-1b --workload fixed --num-prompts 64 --input-len 1600 \
    --output-len 32 --prefix-caching on,off --skip-peer --json "$OUT/prefix_unshared.json" \
    > "$OUT/prefix_unshared.log" 2>&1
unshared_rc=$?

echo
echo "== GPU tests: exit $tests_rc"; tail -n 3 "$OUT/gpu_tests.log"
echo "== kernels: exit $kernels_rc"; tail -n 28 "$OUT/kernels.log"
echo "== host step build: exit $host_rc"; tail -n 4 "$OUT/host_step_build.log"
echo "== throughput 8B vs transformers, M = 1 async on / off: exit $e2e_rc"; tail -n 8 "$OUT/throughput_8b.log"
echo "== prefix cache, few-shot (1,500 shared + 64 x 100 in / 32 out): exit $fewshot_rc"; tail -n 3 "$OUT/prefix_fewshot.log"
echo "== prefix cache, no sharing (64 x 1,600 in / 32 out): exit $unshared_rc"; tail -n 3 "$OUT/prefix_unshared.log"
