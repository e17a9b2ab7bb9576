"""Microbenchmarks of `pipemax autotune`: what this server's links and GPUs really do.

  - copy_rates: KV chunks gathered host -> GPU and GPU -> host, by chunk size, the two ways a copy
    can go: one cudaMemcpyAsync per chunk ("memcpy") or one launch of PipeMax's Triton copy kernel
    reading pinned memory over PCIe ("kernel", the engine's path);
  - both_directions: a prefetch and a write-back at once (separate copy engines, or not);
  - copy_beside_matmul: a prefetch while matmuls run on the compute stream, and how much slower
    the matmuls get;
  - step_costs: the model's step time over a grid of batch tokens x context, through the engine
    itself on random weights of the model's shape, fitted to the offload cost model (per layer,
    and the LM head's share);
  - activation_link: hidden states from GPU 0 to GPU 1, when there are two.

On a machine without a GPU they run on the CPU (host memory to host memory, the torch code the
engine runs there), so a profile can still be written; the figures then describe the CPU.
Every function returns plain numbers for the profile's "measurements".

Each measurement is repeated; repeats that disagree by more than NOISE_LIMIT mean something else
used the device or the cores meanwhile. Such a measurement is taken again (at most RETRIES more
times), and one still noisy is recorded in the NoiseCheck passed in: autotune then refuses to
save a profile made of it.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
import weakref
from collections.abc import Callable

import torch

from pipemax import kernels
from pipemax.core.kv_dtype import kv_storage_name, kv_token_bytes
from pipemax.models import ModelConfig, build_model
from pipemax.worker.kv_pool import KVPoolSpec, pinned_empty, unpin

GB = 1e9
# The busy 2-core machine measured a layer's cost per token 50x too high. Repeats of one
# measurement on a quiet machine agree within tens of percent; most of them twice as slow as the
# fastest is another job's doing.
NOISE_LIMIT = 2.0
RETRIES = 2


def spread(times: list[float]) -> float:
    """How far a measurement's repeats disagree: the middle one over the fastest (1.0: they agree).
    The middle one, not the slowest: one slow repeat is a hiccup (a page fault, a context switch),
    most of them slow is a machine that is busy."""
    ordered = sorted(t for t in times if t > 0)
    if len(ordered) < 2:
        return 1.0
    return ordered[len(ordered) // 2] / ordered[0]  # (of two, the slower)


class NoiseCheck:
    """Takes a measurement again while its repeats disagree by more than `limit` (at most `retries`
    more times, keeping the attempt that agreed best) and remembers those still noisy."""

    def __init__(self, limit: float = NOISE_LIMIT, retries: int = RETRIES):
        self.limit, self.retries = limit, retries
        self.noisy: dict[str, float] = {}  # what was measured -> its repeats' spread after every retry

    def measure(self, what: str, attempt: Callable[[], object],
                times_of: Callable[[object], list[float]] = lambda result: result):
        """attempt() takes the measurement once; times_of(its result) are the repeats' seconds."""
        best, best_spread = None, math.inf
        for _ in range(1 + self.retries):
            result = attempt()
            ratio = spread(times_of(result))
            if ratio < best_spread:
                best, best_spread = result, ratio
            if ratio <= self.limit:
                return result
        self.noisy[what] = best_spread
        return best

    def worst(self) -> tuple[str, float] | None:
        """(what, spread) of the noisiest measurement kept, or None when every one agreed."""
        return max(self.noisy.items(), key=lambda item: item[1]) if self.noisy else None


def _repeat_times(device: torch.device, run: Callable[[], None], repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of run, after one warm-up call (device time on CUDA)."""
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [torch.cuda.Event(enable_timing=True) for _ in range(repeats + 1)]
        events[0].record()
        for event in events[1:]:
            run()
            event.record()
        events[-1].synchronize()
        return [start.elapsed_time(end) / 1000 for start, end in zip(events, events[1:])]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return times


def _timed(device: torch.device, run: Callable[[], None], repeats: int, noise: NoiseCheck | None = None,
           what: str = "") -> float:
    """Seconds per call of run, the mean of `repeats` calls (taken again while they disagree, with
    a NoiseCheck)."""
    def attempt() -> list[float]:
        return _repeat_times(device, run, repeats)

    times = noise.measure(what, attempt) if noise is not None else attempt()
    return sum(times) / len(times)


class _Pools:
    """A host pool (pinned on CUDA) and a device pool of the same chunks, and shuffled ids: a
    prefetch gathers chunks scattered over the pools. An fp8 pool's chunks carry their scales in a
    block of their own, copied with them as the engine's pools do."""

    def __init__(self, spec: KVPoolSpec, device: torch.device, total_bytes: int, seed: int = 0):
        self.count = max(4, total_bytes // spec.chunk_bytes)
        self.bytes = self.count * spec.chunk_bytes  # what a copy of every chunk moves (fp8: scales included)
        self.host, self.device_pool = self._pair((self.count, *spec.chunk_shape), spec.kv_dtype, device)
        self.host_scales = self.device_scales = None
        if spec.fp8:
            self.host_scales, self.device_scales = self._pair((self.count, *spec.scales_shape), torch.float32, device)
        generator = torch.Generator().manual_seed(seed)
        self.host_ids = torch.randperm(self.count, generator=generator).to(device)
        self.device_ids = torch.randperm(self.count, generator=generator).to(device)
        self.host_list, self.device_list = self.host_ids.tolist(), self.device_ids.tolist()

    def _pair(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        """(a host tensor, pinned on CUDA; a device tensor) of the shape."""
        if device.type == "cuda":
            host = pinned_empty(shape, dtype)
            weakref.finalize(self, unpin, host)  # unregistered with its pool, as KVPool does
        else:
            host = torch.empty(shape, dtype=dtype)
        return host, torch.empty(shape, dtype=dtype, device=device)

    def copy(self, method: str, to_device: bool) -> None:
        host = (self.host, self.host_scales, self.host_ids, self.host_list)
        on_device = (self.device_pool, self.device_scales, self.device_ids, self.device_list)
        (src, src_scales, src_ids, src_list), (dst, dst_scales, dst_ids, dst_list) = \
            (host, on_device) if to_device else (on_device, host)
        if method == "kernel":
            if self.device_pool.device.type == "cuda":
                kernels.copy_chunks(src, dst, src_ids, dst_ids, src_scales, dst_scales)
            else:  # the engine's copy on the CPU
                kernels.copy_chunks_ref(src, dst, src_ids, dst_ids, src_scales, dst_scales)
            return
        for source, target in zip(src_list, dst_list):  # one cudaMemcpyAsync per chunk (and its scales)
            dst[target].copy_(src[source], non_blocking=True)
            if src_scales is not None:
                dst_scales[target].copy_(src_scales[source], non_blocking=True)


def copy_rates(spec_of: Callable[[int], KVPoolSpec], chunk_sizes: list[int], device: torch.device,
               total_bytes: int, repeats: int = 3, progress: Callable[[], None] = lambda: None,
               noise: NoiseCheck | None = None) -> list[dict]:
    """[{chunk_tokens, chunk_bytes, method, direction, gbs}] for every chunk size, method and
    direction (h2d: host to GPU, a prefetch; d2h: GPU to host, an offload)."""
    rates = []
    for chunk_tokens in chunk_sizes:
        spec = spec_of(chunk_tokens)
        pools = _Pools(spec, device, total_bytes)
        for method in ("memcpy", "kernel"):
            for direction in ("h2d", "d2h"):
                seconds = _timed(device, lambda: pools.copy(method, direction == "h2d"), repeats, noise,
                                 f"{method} {direction} copy of {chunk_tokens}-token chunks")
                rates.append({"chunk_tokens": chunk_tokens, "chunk_bytes": spec.chunk_bytes, "method": method,
                              "direction": direction, "gbs": pools.bytes / seconds / GB})
                progress()
        del pools
    return rates


def concurrent_prefetch_rate(spec: KVPoolSpec, devices: list[torch.device], total_bytes: int,
                             repeats: int = 3, noise: NoiseCheck | None = None) -> float:
    """Bytes/s of the engine's prefetch kernel on the slowest of `devices` while every one of them
    prefetches at once (a thread each, started together): what a pipeline can count on when all
    its stages copy in the same step, as they do (GPUs behind one PCIe switch share its uplink)."""
    pools = [_Pools(spec, device, total_bytes) for device in devices]
    for pool in pools:  # warm-up: the kernel compiled and the pages touched
        pool.copy("kernel", True)

    def attempt() -> list[list[float]]:
        """Each device's seconds per repeat, every device copying at once."""
        seconds = [[] for _ in devices]
        start = threading.Barrier(len(devices))

        def copy(index: int) -> None:
            device = devices[index]
            if device.type == "cuda":
                torch.cuda.set_device(device)
                torch.cuda.synchronize(device)
            start.wait()
            for _ in range(repeats):
                began = time.perf_counter()
                pools[index].copy("kernel", True)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds[index].append(time.perf_counter() - began)

        threads = [threading.Thread(target=copy, args=(index,)) for index in range(len(devices))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return seconds

    def slowest(per_device: list[list[float]]) -> list[float]:  # the device the plan counts on
        return max(per_device, key=sum)

    seconds = slowest(noise.measure("prefetch on every device at once", attempt, slowest) if noise is not None
                      else attempt())
    return min(pool.bytes for pool in pools) * repeats / max(sum(seconds), 1e-9)


def best_chunk_tokens(rates: list[dict], share: float = 0.9) -> tuple[int, float]:
    """The smallest chunk whose kernel prefetch reaches `share` of the best one (small chunks waste
    less of the pool on half-filled last chunks), and its rate in bytes/s."""
    prefetch = sorted((r for r in rates if r["method"] == "kernel" and r["direction"] == "h2d"),
                      key=lambda r: r["chunk_tokens"])
    best = max(r["gbs"] for r in prefetch)
    chosen = next(r for r in prefetch if r["gbs"] >= share * best)
    return chosen["chunk_tokens"], chosen["gbs"] * GB


def both_directions(spec: KVPoolSpec, device: torch.device, total_bytes: int, repeats: int = 3,
                    noise: NoiseCheck | None = None) -> dict:
    """A prefetch and a write-back at once, each on its own stream: the rate of each and together."""
    prefetch_pools, offload_pools = _Pools(spec, device, total_bytes, 1), _Pools(spec, device, total_bytes, 2)
    if device.type == "cuda":
        streams = [torch.cuda.Stream(device), torch.cuda.Stream(device)]

        def run():
            current = torch.cuda.current_stream(device)
            for stream in streams:
                stream.wait_stream(current)
            with torch.cuda.stream(streams[0]):
                prefetch_pools.copy("kernel", True)
            with torch.cuda.stream(streams[1]):
                offload_pools.copy("kernel", False)
            for stream in streams:
                current.wait_stream(stream)
    else:  # no copy engines: one after the other
        def run():
            prefetch_pools.copy("kernel", True)
            offload_pools.copy("kernel", False)
    seconds = _timed(device, run, repeats, noise, "prefetch and write-back at once")
    moved = prefetch_pools.bytes + offload_pools.bytes
    return {"total_gbs": moved / seconds / GB, "each_gbs": moved / 2 / seconds / GB,
            "concurrent": device.type == "cuda"}


def copy_beside_matmul(spec: KVPoolSpec, device: torch.device, dtype: torch.dtype, total_bytes: int,
                       matmul_size: int, matmuls: int, noise: NoiseCheck | None = None) -> dict:
    """A prefetch on its own stream while `matmuls` matmuls run on the compute stream: the copy's
    rate then, and the matmuls' time against the same matmuls alone."""
    pools = _Pools(spec, device, total_bytes, 3)
    a = torch.randn(matmul_size, matmul_size, device=device).to(dtype)
    b = torch.randn(matmul_size, matmul_size, device=device).to(dtype)

    def compute():
        for _ in range(matmuls):
            torch.mm(a, b)

    alone = _timed(device, compute, 2, noise, "matmuls alone")
    if device.type != "cuda":  # nothing runs beside the CPU's matmuls
        copy = _timed(device, lambda: pools.copy("kernel", True), 2, noise, "prefetch beside matmuls")
        return {"copy_gbs": pools.bytes / copy / GB, "matmul_slowdown": 1.0, "concurrent": False}
    stream = torch.cuda.Stream(device, priority=-1)  # the prefetch stream's priority in the engine
    events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]  # copy start/end, compute start/end

    def both():
        compute_stream = torch.cuda.current_stream(device)
        stream.wait_stream(compute_stream)
        with torch.cuda.stream(stream):
            events[0].record(stream)
            pools.copy("kernel", True)
            events[1].record(stream)
        events[2].record(compute_stream)
        compute()  # timed on its own stream: the copy's tail does not count as the matmuls'
        events[3].record(compute_stream)
        compute_stream.wait_stream(stream)

    both()
    torch.cuda.synchronize(device)
    copy_seconds = events[0].elapsed_time(events[1]) / 1000
    matmul_seconds = events[2].elapsed_time(events[3]) / 1000
    return {"copy_gbs": pools.bytes / copy_seconds / GB, "matmul_slowdown": matmul_seconds / alone if alone else 1.0,
            "concurrent": True}


def activation_link(hidden_size: int, dtype: torch.dtype, tokens: int = 4096, repeats: int = 5,
                    noise: NoiseCheck | None = None) -> float | None:
    """GPU 0 -> GPU 1 bytes/s for a step's hidden states (None with fewer than two GPUs)."""
    if torch.cuda.device_count() < 2:
        return None
    source = torch.randn(tokens, hidden_size, device="cuda:0").to(dtype)
    target = torch.empty_like(source, device="cuda:1")
    seconds = _timed(torch.device("cuda:0"), lambda: target.copy_(source, non_blocking=True), repeats, noise,
                     "GPU 0 -> 1 copy")
    torch.cuda.synchronize("cuda:1")
    return source.numel() * source.element_size() / seconds


def step_costs(config: ModelConfig, layers: int, device: torch.device, dtype: torch.dtype,
               pairs: list[tuple[int, int]], chunk_tokens: int = 16,
               progress: Callable[[], None] = lambda: None,
               noise: NoiseCheck | None = None,
               kv_cache_dtype: str = "auto") -> tuple[tuple[float, float, float], dict]:
    """(alpha, beta, delta) of a model of `layers` layers of config's shape (with its embedding and
    LM head), fitted to the engine's own measured steps over (batch, prompt length) pairs (each a
    prefill, then decodes): the cost model the engine itself fits, its KV cache in kv_cache_dtype
    (beta is attention's read of a context token in that storage). Also {samples, mean error}.
    A pair's decode steps are its repeats (the same batch, nearly the same context)."""
    from pipemax.core.cost_model import StepCostModel
    from pipemax.core.sampling_params import SamplingParams
    from pipemax.engine.llm_engine import EngineConfig, LLMEngine

    stage_config = dataclasses.replace(config, num_layers=layers)
    storage = kv_storage_name(kv_cache_dtype, str(dtype).removeprefix("torch."))
    pairs = fitting_pairs(stage_config, layers, device, dtype, pairs, chunk_tokens, storage)
    torch.manual_seed(0)
    model = build_model(stage_config, device=device, dtype=dtype)
    for param in model.parameters():  # random weights of a sane scale: the time is the same
        torch.nn.init.normal_(param, std=0.02)
    max_batch, longest = max(b for b, _ in pairs), max(p for _, p in pairs)
    kv_tokens = max(batch * (prompt + 8 + chunk_tokens) for batch, prompt in pairs)
    kv_gib = kv_tokens * kv_token_bytes(layers, config.num_kv_heads, config.head_dim, storage, chunk_tokens) / 2**30
    engine = LLMEngine(EngineConfig(
        model=f"random:{config.architecture}", dtype=str(dtype).removeprefix("torch."), device=str(device),
        max_num_seqs=max_batch, max_num_batched_tokens=max(2048, max_batch), chunk_tokens=chunk_tokens,
        kv_cache_gib=max(kv_gib * 1.2, 1 / 64), max_model_len=longest + 8, kv_cache_dtype=kv_cache_dtype), model=model)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    def run_pair(batch: int, prompt: int) -> list[tuple[int, int, float]]:
        """The pair's measured steps: (batch tokens, context tokens, seconds)."""
        engine.cost_model = StepCostModel()
        for index in range(batch):
            engine.add_request([(7 * index + position) % config.vocab_size for position in range(prompt)], params)
        for _ in engine.run():
            pass
        return list(engine.cost_model.samples)

    for batch, prompt in pairs:  # the first pass compiles kernels and captures graphs
        run_pair(batch, prompt)
    samples = []
    for batch, prompt in pairs:
        if noise is None:
            samples += run_pair(batch, prompt)
        else:
            samples += noise.measure(f"step time at batch {batch} x {prompt} prompt tokens",
                                     lambda: run_pair(batch, prompt), decode_seconds)  # noqa: B023 (called here)
        progress()
    fit = StepCostModel(window=len(samples) + 1)
    fit.samples.extend(samples)
    fit.fit()
    errors = [abs(fit.predict(tokens, context) - seconds) / seconds for tokens, context, seconds in samples
              if seconds > 0 and fit.ready]
    del engine, model
    return fit.coefficients or (0.0, 0.0, 0.0), {
        "samples": len(samples), "mean_relative_error": sum(errors) / len(errors) if errors else None}


def decode_seconds(samples: list[tuple[int, int, float]]) -> list[float]:
    """The seconds of a pair's decode steps: its steps of the fewest tokens (one a sequence)."""
    fewest = min((tokens for tokens, _, _ in samples), default=0)
    return [seconds for tokens, _, seconds in samples if tokens == fewest]


def fitting_pairs(stage_config: ModelConfig, layers: int, device: torch.device, dtype: torch.dtype,
                  pairs: list[tuple[int, int]], chunk_tokens: int, kv_storage: str) -> list[tuple[int, int]]:
    """The grid's (batch, prompt) pairs whose KV (in kv_storage, core/kv_dtype.py) fits beside the
    measured model's weights on the device (90% of what is free now); at least the smallest pair."""
    from pipemax.worker.memory_budget import kv_budget_bytes

    if device.type != "cuda":
        return pairs
    free, _ = torch.cuda.mem_get_info(device)
    budget = kv_budget_bytes(int(0.9 * free), stage_config, [(0, layers)], dtype, 2048, max(b for b, _ in pairs), True)
    token_bytes = kv_token_bytes(layers, stage_config.num_kv_heads, stage_config.head_dim, kv_storage, chunk_tokens)
    fitting = [(b, p) for b, p in pairs if b * (p + 8 + chunk_tokens) * token_bytes * 1.2 <= budget]
    return fitting or [min(pairs)]


def split_layer_costs(fits: dict[int, tuple[float, float, float]]):
    """Per-layer and LM-head costs (server_plan.ComputeCosts) from (alpha, beta, delta) fitted at
    two depths: the difference per layer is a layer's, what is left at the shallower depth the
    head's and the step's fixed overhead (each clipped at zero: noise)."""
    from .server_plan import ComputeCosts
    from .simulator import StageCosts

    (shallow, fit_shallow), (deep, fit_deep) = sorted(fits.items())
    layer = [max(0.0, (d - s) / (deep - shallow)) for d, s in zip(fit_deep, fit_shallow)]
    if not any(layer):  # the depths did not differ beyond noise (tiny models on a busy CPU): share it out
        return ComputeCosts(StageCosts(*(value / deep for value in fit_deep)), StageCosts(0.0, 0.0, 0.0))
    head = [max(0.0, s - shallow * per) for s, per in zip(fit_shallow, layer)]
    return ComputeCosts(StageCosts(*layer), StageCosts(*head))
