"""Kernel benchmarks on Llama-3-8B shapes, against hardware peaks measured in the same run.

    python bench/bench_kernels.py [--json results.json]     on a CUDA GPU
    python bench/bench_kernels.py --smoke                   tiny shapes on CPU (interpreter): checks the
                                                      script runs; its numbers mean nothing

Peaks: HBM = device-to-device copy (read + write counted); PCIe = one large pinned copy per
direction; matmul = bf16 8192^3. Targets (issue 2): decode attention >= 70% of HBM at batch 128 x
2k context; host->GPU copy of scattered 2 MiB chunks >= 85% of the pinned-copy peak; write-back
of one token's rows for 256 sequences x 32 layers >= 80% of the device->host peak.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_peaks import measure_peaks, time_ms  # noqa: E402
from pipemax import kernels  # noqa: E402

# Llama-3-8B attention shape.
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, NUM_LAYERS = 32, 8, 128, 32


@dataclass
class Row:
    name: str
    shape: str
    ms: float
    rate: float  # GB/s or TFLOP/s
    unit: str
    peak_fraction: float | None = None
    target: float | None = None
    baseline_ms: float | None = None

    @property
    def verdict(self) -> str:
        if self.target is None or self.peak_fraction is None:
            return ""
        return "ok" if self.peak_fraction >= self.target else "MISS"


class Bench:
    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.device = torch.device("cpu" if smoke else "cuda")
        self.dtype = torch.float32 if smoke else torch.bfloat16
        self.rows: list[Row] = []

    def time_ms(self, fn) -> float:
        return time_ms(fn, self.device)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # ---- peaks ------------------------------------------------------------------------------
    def measure_peaks(self) -> dict[str, float]:
        peaks = measure_peaks(self.device, self.dtype, small=self.smoke)
        for name, value in peaks.items():
            unit = "TFLOP/s" if "tflops" in name else "GB/s"
            self.rows.append(Row(f"peak: {name.split('_')[0]}", "", 0.0, value, unit))
        return peaks

    # ---- kernels ----------------------------------------------------------------------------
    def random_tables(self, batch: int, chunks_per_seq: int, num_chunks: int) -> torch.Tensor:
        """Each sequence's chunks scattered over the pool, as after many allocations and frees."""
        order = torch.randperm(num_chunks)[: batch * chunks_per_seq]
        return order.view(batch, chunks_per_seq).to(torch.int32).to(self.device)

    def decode(self, peaks, batch: int, context: int, chunk_tokens: int = 16, num_stages: int | None = None,
               num_splits: int | None = None, fp8: bool = False):
        """Decode attention over scattered chunks. num_stages / num_splits: a variant against the
        default tiles (issue 22: two stages, 5 CTAs an SM; two splits at short contexts)."""
        import importlib

        decode_module = importlib.import_module("pipemax.kernels.decode_attention")
        default_tiles = decode_module.decode_tiles
        if num_stages is not None:
            decode_module.decode_tiles = lambda *args: {**default_tiles(*args), "num_stages": num_stages}
        try:
            self._decode(peaks, batch, context, chunk_tokens, num_stages, num_splits, fp8)
        finally:
            decode_module.decode_tiles = default_tiles

    def _decode(self, peaks, batch: int, context: int, chunk_tokens: int, num_stages, num_splits, fp8: bool):
        chunks_per_seq = -(-context // chunk_tokens)
        num_chunks = batch * chunks_per_seq
        layers = 2  # the per-layer read pattern does not depend on how many layers a chunk holds
        pool = torch.randn(num_chunks, layers, 2, chunk_tokens, NUM_KV_HEADS, HEAD_DIM, device=self.device,
                           dtype=self.dtype)
        scales = None
        if fp8:  # e4m3 KV, a float32 scale per row and head (read beside the tile: counted below)
            pool = pool.to(torch.float8_e4m3fn)
            scales = torch.rand(pool.shape[:5], device=self.device) * 0.01
        tables = self.random_tables(batch, chunks_per_seq, num_chunks)
        lens = torch.full((batch,), context, dtype=torch.int32, device=self.device)
        q = torch.randn(batch, NUM_HEADS, HEAD_DIM, device=self.device, dtype=self.dtype)
        scale = 1 / math.sqrt(HEAD_DIM)
        ms = self.time_ms(lambda: kernels.decode_attention(q, pool, 1, tables, lens, scale, max_seq_len=context,
                                                           num_splits=num_splits, kv_scales=scales))
        row_bytes = HEAD_DIM * pool.element_size() + (4 if fp8 else 0)
        nbytes = batch * context * NUM_KV_HEADS * 2 * row_bytes + 2 * q.numel() * q.element_size()
        rate = nbytes / ms / 1e6
        target = 0.85 if (batch, context) == (128, 2048) and num_stages is None and num_splits is None \
            and not fp8 else None
        variant = "".join(f" {name}={value}" for name, value in (("stages", num_stages), ("splits", num_splits))
                          if value is not None) + (" fp8" if fp8 else "")
        self.rows.append(Row("decode_attention", f"B={batch} ctx={context}{variant}", ms, rate, "GB/s",
                             rate / peaks["hbm_gbps"], target))

    def prefill(self, peaks, batch: int, new_tokens: int, prefix: int, chunk_tokens: int = 16):
        total = prefix + new_tokens
        chunks_per_seq = -(-total // chunk_tokens)
        num_chunks = batch * chunks_per_seq
        pool = torch.randn(num_chunks, 1, 2, chunk_tokens, NUM_KV_HEADS, HEAD_DIM, device=self.device, dtype=self.dtype)
        tables = self.random_tables(batch, chunks_per_seq, num_chunks)
        cu = torch.arange(0, batch + 1, dtype=torch.int32, device=self.device) * new_tokens
        lens = torch.full((batch,), total, dtype=torch.int32, device=self.device)
        q = torch.randn(batch * new_tokens, NUM_HEADS, HEAD_DIM, device=self.device, dtype=self.dtype)
        blocks = dict(block_m=16, block_n=16) if self.smoke else {}
        ms = self.time_ms(lambda: kernels.prefill_attention(q, pool, 0, tables, cu, lens, 0.088, max_q_len=new_tokens, **blocks))
        # Causal: query i sees prefix + i + 1 keys; QK^T and PV are 2 flops per multiply-add each.
        pairs = batch * (new_tokens * prefix + new_tokens * (new_tokens + 1) / 2)
        rate = 4 * pairs * NUM_HEADS * HEAD_DIM / ms / 1e9
        self.rows.append(Row("prefill_attention", f"B={batch} new={new_tokens} prefix={prefix}", ms, rate, "TFLOP/s",
                             rate / peaks["matmul_tflops"]))

    def store(self, peaks, tokens: int, chunk_tokens: int = 16):
        num_chunks = -(-tokens // chunk_tokens) * 2
        pool = torch.zeros(num_chunks, 2, 2, chunk_tokens, NUM_KV_HEADS, HEAD_DIM, device=self.device, dtype=self.dtype)
        k = torch.randn(tokens, NUM_KV_HEADS, HEAD_DIM, device=self.device, dtype=self.dtype)
        v = torch.randn_like(k)
        slots = torch.randperm(num_chunks * chunk_tokens)[:tokens].to(self.device)
        ms = self.time_ms(lambda: kernels.store_kv(k, v, pool, 1, slots))
        rate = 4 * k.numel() * k.element_size() / ms / 1e6  # read k, v; write both
        self.rows.append(Row("store_kv", f"tokens={tokens}", ms, rate, "GB/s", rate / peaks["hbm_gbps"]))

    def chunk_copies(self, peaks, num_copies: int, chunk_tokens: int, layers: int):
        pin = self.device.type == "cuda"
        shape = (layers, 2, chunk_tokens, NUM_KV_HEADS, HEAD_DIM)
        # Random data, never zeros: zeros can hide unwritten outputs and run faster than real data.
        gpu = torch.randn(2 * num_copies, *shape, device=self.device, dtype=self.dtype)
        host = torch.randn(2 * num_copies, *shape, dtype=self.dtype).pin_memory() if pin else \
            torch.randn(2 * num_copies, *shape, dtype=self.dtype)
        src_ids = torch.randperm(2 * num_copies)[:num_copies].to(torch.int32)
        dst_ids = torch.randperm(2 * num_copies)[:num_copies].to(torch.int32)
        src_list, dst_list = src_ids.tolist(), dst_ids.tolist()
        src_ids, dst_ids = src_ids.to(self.device), dst_ids.to(self.device)
        nbytes = num_copies * gpu[0].numel() * gpu.element_size()
        chunk_mib = gpu[0].numel() * gpu.element_size() / 2**20
        for direction, src, dst, peak in (("host->GPU", host, gpu, "h2d_gbps"), ("GPU->host", gpu, host, "d2h_gbps")):
            ms = self.time_ms(lambda: kernels.copy_chunks(src, dst, src_ids, dst_ids))

            def per_chunk_memcpy():
                for s, d in zip(src_list, dst_list):
                    dst[d].copy_(src[s], non_blocking=True)

            baseline = self.time_ms(per_chunk_memcpy)
            rate = nbytes / ms / 1e6
            target = 0.85 if direction == "host->GPU" and not self.smoke else None
            self.rows.append(Row(f"copy_chunks {direction}", f"{num_copies} x {chunk_mib:.2f} MiB", ms, rate, "GB/s",
                                 rate / peaks[peak], target, baseline))

    def write_back(self, peaks, sequences: int, layers: int, chunk_tokens: int = 16):
        pin = self.device.type == "cuda"
        shape = (layers, 2, chunk_tokens, NUM_KV_HEADS, HEAD_DIM)
        gpu = torch.randn(sequences, *shape, device=self.device, dtype=self.dtype)
        host = torch.randn(2 * sequences, *shape, dtype=self.dtype).pin_memory() if pin else \
            torch.randn(2 * sequences, *shape, dtype=self.dtype)
        gpu_ids = torch.arange(sequences, dtype=torch.int32)
        host_ids = torch.randperm(2 * sequences)[:sequences].to(torch.int32)
        rows = torch.randint(0, chunk_tokens, (sequences,), dtype=torch.int32)
        triples = list(zip(gpu_ids.tolist(), host_ids.tolist(), rows.tolist()))
        gpu_ids, host_ids, rows = gpu_ids.to(self.device), host_ids.to(self.device), rows.to(self.device)
        ms = self.time_ms(lambda: kernels.copy_rows(gpu, host, gpu_ids, host_ids, rows, 0, layers))

        def per_row_memcpy():
            for g, h, r in triples:
                for layer in range(layers):
                    host[h, layer, :, r].copy_(gpu[g, layer, :, r], non_blocking=True)

        baseline = self.time_ms(per_row_memcpy)
        nbytes = sequences * layers * 2 * NUM_KV_HEADS * HEAD_DIM * gpu.element_size()
        rate = nbytes / ms / 1e6
        target = None if self.smoke else 0.80
        self.rows.append(Row("copy_rows GPU->host", f"{sequences} seqs x {layers} layers, 1 token", ms, rate, "GB/s",
                             rate / peaks["d2h_gbps"], target, baseline))

    def prefetch_beside_compute(self, peaks, num_copies: int, layers: int, chunk_tokens: int = 16):
        """The transfer path as a stage uses it: KVTransfers prefetching num_copies chunks on its
        own stream while matmuls keep the compute stream busy; bandwidth against the pinned peak."""
        from pipemax.worker.kv_pool import KVPool, KVPoolSpec
        from pipemax.worker.kv_transfers import KVTransfers

        spec = KVPoolSpec(layers, NUM_KV_HEADS, HEAD_DIM, chunk_tokens, self.dtype)
        pool = KVPool(spec, num_copies, num_copies, self.device, backend="torch" if self.smoke else "triton")
        pool.host.normal_()
        transfers = KVTransfers(pool)
        size = 256 if self.smoke else 8192
        a = torch.randn(size, size, device=self.device, dtype=self.dtype)
        pairs = [(i, (i * 7) % num_copies) for i in range(num_copies)]  # scattered destinations

        def compute(count):
            for _ in range(count):
                a @ a

        matmuls = 2 if self.smoke else 60  # longer than the copy: it runs beside compute throughout
        transfers.prefetch(0, pairs)  # warm-up: compiles the copy kernel
        compute(1)
        self.sync()
        alone = time_ms(lambda: compute(matmuls), self.device) / 1e3
        before = transfers.counters()["copy_seconds"]
        start, end = self.events()
        start.record()
        compute(matmuls)
        end.record()
        transfers.prefetch(0, pairs)
        self.sync()
        beside = self.elapsed(start, end)
        seconds = transfers.counters()["copy_seconds"] - before
        rate = num_copies * spec.chunk_bytes / seconds / 1e9
        target = None if self.smoke else 0.85
        shape = f"{num_copies} x {spec.chunk_bytes / 2**20:.2f} MiB"
        self.rows.append(Row("prefetch beside compute", shape, seconds * 1e3, rate, "GB/s", rate / peaks["h2d_gbps"],
                             target))
        # What the prefetch (on its higher-priority stream) costs the compute it runs beside.
        self.rows.append(Row("compute beside prefetch", f"{matmuls} matmuls {size}^2", beside * 1e3,
                             100 * (beside / alone - 1), "% slower", None, None, alone * 1e3))

    def events(self):
        if self.device.type == "cuda":
            return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        return _WallClock(), _WallClock()

    @staticmethod
    def elapsed(start, end) -> float:
        if isinstance(start, _WallClock):
            return end.time - start.time
        return start.elapsed_time(end) / 1000

    def timed(self, work) -> float:
        start, end = self.events()
        start.record()
        work()
        end.record()
        self.sync()
        return self.elapsed(start, end)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def run(self):
        peaks = self.measure_peaks()
        if self.smoke:
            self.decode(peaks, batch=2, context=40)
            self.decode(peaks, batch=2, context=40, num_stages=2, num_splits=2)
            self.decode(peaks, batch=2, context=40, fp8=True)
            self.prefill(peaks, batch=2, new_tokens=20, prefix=8)
            self.store(peaks, tokens=8)
            self.chunk_copies(peaks, num_copies=3, chunk_tokens=16, layers=2)
            self.write_back(peaks, sequences=3, layers=2)
            self.prefetch_beside_compute(peaks, num_copies=4, layers=2)
            return
        for batch in (64, 128, 256):
            for context in (512, 2048, 8192):
                self.decode(peaks, batch, context)
                torch.cuda.empty_cache()
        # Issue 22's decode-attention choices, against the default rows above: two pipeline stages
        # (more CTAs an SM), and two splits below ~1k context (a shorter wave tail).
        for context in (512, 1024, 2048):
            self.decode(peaks, 128, context, num_stages=2)
        for context in (512, 1024):
            self.decode(peaks, 128, context, num_splits=2)
        for context in (2048, 8192):  # issue 23: fp8 KV, half the bytes (their HBM rate against the rows above)
            self.decode(peaks, 128, context, fp8=True)
        self.prefill(peaks, batch=4, new_tokens=2048, prefix=0)
        self.prefill(peaks, batch=4, new_tokens=512, prefix=3584)
        self.store(peaks, tokens=4096)
        self.chunk_copies(peaks, num_copies=512, chunk_tokens=16, layers=NUM_LAYERS)  # 2 MiB chunks, 1 GiB
        self.write_back(peaks, sequences=256, layers=NUM_LAYERS)
        self.prefetch_beside_compute(peaks, num_copies=256, layers=NUM_LAYERS)  # 2 MiB chunks, 512 MiB


class _WallClock:
    """CPU stand-in for a CUDA timing event."""

    def record(self):
        self.time = time.perf_counter()


def format_table(rows: list[Row], device_name: str) -> str:
    lines = [f"device: {device_name}",
             f"{'kernel':<24} {'shape':<34} {'ms':>9} {'rate':>16} {'of peak':>8} {'target':>7} {'baseline ms':>12}"]
    for row in rows:
        fraction = f"{row.peak_fraction:.0%}" if row.peak_fraction is not None else ""
        target = f">={row.target:.0%} {row.verdict}" if row.target is not None else ""
        baseline = f"{row.baseline_ms:.3f}" if row.baseline_ms is not None else ""
        lines.append(f"{row.name:<24} {row.shape:<34} {row.ms:>9.3f} {row.rate:>8.1f} {row.unit:<7} "
                     f"{fraction:>8} {target:>7} {baseline:>12}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU: check the script, not the speed")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --smoke)")
    bench = Bench(args.smoke)
    bench.run()
    name = "CPU (smoke)" if args.smoke else torch.cuda.get_device_name()
    print(format_table(bench.rows, name))
    if args.json:
        args.json.write_text(json.dumps({"device": name, "rows": [asdict(r) for r in bench.rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
