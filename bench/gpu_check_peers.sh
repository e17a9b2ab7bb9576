#!/usr/bin/env bash
# Third device call (after bench/gpu_check.sh and bench/gpu_check_offload.sh):
#   bash bench/gpu_check_peers.sh     (device tool: timeout_s 300; the section timeouts add up to 260 s)
# 1. Issue 8: KV offload where VRAM limits the batch. LongBench-like lengths (2,700 in / 100 out),
#    Llama-3-8B shapes, 24 GiB cap, two micro-batches, P = 1 and P = 2 in process: off, auto, force.
# 2. Issue 10: `pipemax autotune` on this GPU, then the engine against what the simulator predicts
#    from that profile: P = 1 (within 10%), P = 2 in process (15%).
# 3. Issue 11: the peers on one workload (OPT-6.7B shape, 256 x 512 in / 32 out, a 32 GiB cap):
#    transformers generate (dynamic and offloaded cache), FlexGen where installed, PipeMax.
# Logs go to $OUT (the device tool's output folder) or bench/out; a short table last.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"

timeout 90 "$PY" bench/bench_throughput.py --model llama-3-8b --workload longbench --num-prompts 48 \
    --memory-cap-gib 24 --skip-peer --pipeline-parallel 1,2 --micro-batches 2 --offload off,auto,force \
    --host-memory-gib 48 --json "$OUT/offload_8b.json" > "$OUT/offload_8b.log" 2>&1
offload_rc=$?

timeout 80 "$PY" bench/bench_calibrate.py --json "$OUT/calibrate.json" > "$OUT/calibrate.log" 2>&1
calibrate_rc=$?

timeout 90 "$PY" bench/bench_peers.py --caps 32 --flexgen-timeout 80 --json "$OUT/peers.json" --plot "$OUT/peers.png" \
    > "$OUT/peers.log" 2>&1
peers_rc=$?

echo
echo "== offload 8B LongBench, 24 GiB: exit $offload_rc"; tail -n 9 "$OUT/offload_8b.log"
echo "== autotune + simulator calibration: exit $calibrate_rc"; grep -E "^copies|^step costs" "$OUT/calibrate.log"; tail -n 4 "$OUT/calibrate.log"
echo "== peers, OPT-6.7B, 32 GiB: exit $peers_rc"; tail -n 8 "$OUT/peers.log"
