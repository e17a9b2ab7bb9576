"""Hardware peaks measured in the benchmark's own run: every rate is read against these."""

from __future__ import annotations

import statistics
import time

import torch


def time_ms(fn, device: torch.device) -> float:
    """Median milliseconds per call: triton's do_bench on CUDA, a few timed calls on CPU."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def measure_peaks(device: torch.device, dtype: torch.dtype, small: bool = False) -> dict[str, float]:
    """hbm_gbps (device copy, read + write), h2d_gbps / d2h_gbps (one large pinned copy),
    matmul_tflops (square matmul in dtype)."""
    nbytes = 2**20 if small else 2**30
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    peaks = {
        "hbm_gbps": 2 * nbytes / time_ms(lambda: dst.copy_(src), device) / 1e6,
        "h2d_gbps": nbytes / time_ms(lambda: dst.copy_(pinned, non_blocking=True), device) / 1e6,
        "d2h_gbps": nbytes / time_ms(lambda: pinned.copy_(dst, non_blocking=True), device) / 1e6,
    }
    n = 256 if small else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    peaks["matmul_tflops"] = 2 * n**3 / time_ms(lambda: a @ b, device) / 1e9
    return peaks
