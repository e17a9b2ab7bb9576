"""Host time to prepare one decode step's batch tensors: the device-resident chunk tables
(worker/device_tables.py: changed chunks only, one packed upload, positions and slots derived on
the device) against the from-scratch rebuild they replaced (every table as Python lists, one
upload per tensor), measured in the same run. On a GPU the figure is the host's share only: the
launches are asynchronous.

    python bench/bench_host_step.py [--batch 128] [--context 700] [--chunk-tokens 16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipemax.core.kv_manager import KVManager  # noqa: E402
from pipemax.core.step_plan import StagePlan  # noqa: E402
from pipemax.worker.device_tables import DeviceChunkTables, build_step_tensors  # noqa: E402


def rebuild_from_scratch(kv: KVManager, plan: StagePlan, upload):
    """The previous host path: positions, slots and padded tables as lists, one upload each."""
    positions, slots = [], []
    for seq_id, start, count in zip(plan.seq_ids, plan.starts, plan.counts):
        positions += range(start, start + count)
        slots += kv.slots(seq_id, start, start + count)
    tables = [kv.chunk_table(seq_id) for seq_id in plan.seq_ids]
    width = max(len(t) for t in tables)
    padded = [t + [0] * (width - len(t)) for t in tables]
    ends = [s + c for s, c in zip(plan.starts, plan.counts)]
    return (upload(torch.tensor(positions, dtype=torch.int64)), upload(torch.tensor(slots, dtype=torch.int64)),
            upload(torch.tensor(padded, dtype=torch.int32)), upload(torch.tensor(ends, dtype=torch.int32)),
            upload(torch.tensor(plan.token_ids, dtype=torch.int64)),
            upload(torch.tensor(plan.sample_rows(), dtype=torch.int64)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--context", type=int, default=700)
    parser.add_argument("--chunk-tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def upload(tensor):
        return tensor if device.type == "cpu" else tensor.pin_memory().to(device, non_blocking=True)

    longest = args.context + 2 * (args.steps + 20)  # both builds append a token per step
    kv = KVManager(args.batch * (longest // args.chunk_tokens + 2), 0, args.chunk_tokens)
    for seq_id in range(args.batch):
        kv.allocate(seq_id, args.context)
    tables = DeviceChunkTables(device)
    results = {}
    for name, build in (("from scratch (before)", lambda plan: rebuild_from_scratch(kv, plan, upload)),
                        ("device tables (now)", lambda plan: build_step_tensors(tables, kv, plan, args.chunk_tokens,
                                                                                upload, True, True))):
        seconds = 0.0
        for step in range(args.steps + 20):
            for seq_id in range(args.batch):  # each step appends a token: a new chunk now and then
                kv.append(seq_id, 1)
            length = kv.sequence(0).num_tokens
            plan = StagePlan(0, [], list(range(args.batch)), [length - 1] * args.batch, [1] * args.batch,
                             args.batch, [True] * args.batch, [1] * args.batch)
            started = time.perf_counter()
            build(plan)
            if step >= 20:  # warm-up outside the figure
                seconds += time.perf_counter() - started
        if device.type == "cuda":
            torch.cuda.synchronize()
        results[name] = seconds / args.steps * 1e6
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"host time to build a decode step: {args.batch} sequences, context ~{args.context}, "
          f"chunks of {args.chunk_tokens}, on {name}")
    for label, micros in results.items():
        print(f"  {label:<24} {micros:8.0f} us")
    before, now = results["from scratch (before)"], results["device tables (now)"]
    print(f"  ratio {before / now:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
