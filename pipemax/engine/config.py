"""Engine options, checked before anything loads: `EngineConfig`, whose faults raise the
`ConfigError` (core/errors.py) that names the option at fault (the CLI maps options to its flags)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from pipemax.core.errors import ConfigError
from pipemax.core.kv_dtype import KV_CACHE_DTYPES, kv_storage_name
from pipemax.core.sampling_params import SEED_RANGE
from pipemax.worker.kv_pool import KV_TORCH_DTYPES, MAX_CHUNK_TOKENS, MIN_CHUNK_TOKENS

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OFFLOAD_MODES = ("off", "auto", "force")
PIPELINE_TRANSPORTS = ("distributed", "inprocess")


def available_host_memory_gib() -> float | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


TRACE_PREFIX = b'{"traceEvents"'  # how every trace Timeline.write_trace writes begins


def check_trace_path(trace, overwrite: bool = False) -> None:
    """The trace is written after a run: check now that it can be, and that it replaces nothing but
    an earlier trace (or an empty file) unless overwrite says so."""
    if not isinstance(trace, (str, os.PathLike)) or not str(trace):
        raise ConfigError("trace", f"must be a file path, got {trace!r}")
    path = Path(trace)
    if path.is_dir():
        raise ConfigError("trace", f"{path} is a folder: name a file, e.g. {path / 'trace.json'}")
    if not path.parent.is_dir():
        raise ConfigError("trace", f"{path}: its folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise ConfigError("trace", f"{path}: its folder {path.parent} is not writable")
    if path.exists() and not overwrite:
        try:
            with open(path, "rb") as existing:
                head = existing.read(len(TRACE_PREFIX))
        except OSError as error:
            raise ConfigError("trace", f"cannot read the existing {path} ({error.strerror})") from None
        if head and head != TRACE_PREFIX:
            raise ConfigError("trace", f"{path} exists and is not a PipeMax trace: name another file, or delete "
                                       "it (the CLI's --overwrite replaces it)")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class EngineConfig:
    model: str  # local HF folder (safetensors) or .gguf file
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    device: str = "auto"  # auto: cuda if available
    chunk_tokens: int = 16  # tokens per KV chunk
    max_num_seqs: int = 256  # sequences in one step (--max-batch)
    max_num_batched_tokens: int = 2048  # tokens in one step (decode tokens + prefill pieces)
    gpu_memory_gib: float | None = None  # device memory PipeMax may use, weights included (CUDA)
    kv_cache_gib: float | None = None  # KV pool size; default: what gpu_memory_gib leaves (CPU: 1 GiB)
    attention_backend: str = "auto"  # triton | torch; auto: triton on CUDA, torch on CPU
    prefill_mode: str = "mixed"  # mixed | separate (see scheduler)
    max_model_len: int | None = None  # tokens per sequence, prompt + output; default: the model's
    seed: int = 0  # for requests without a seed of their own
    cuda_graphs: bool = True  # every step replays CUDA graphs (CUDA with the Triton backend only)
    # One micro-batch in one process: launch each step before the one before it has returned its
    # tokens (they reach the next step's input on the device), so the device never waits for the
    # host's planning. Outputs are the same either way.
    async_scheduling: bool = True
    pipeline_parallel: int = 1  # pipeline stages
    micro_batches: int | None = None  # micro-batches in flight; default: as many as stages
    pipeline_transport: str = "distributed"  # a process per stage and device, or inprocess (all on one device)
    stage_timeout: float = 60.0  # seconds without an answer from a stage process before the job ends
    data_parallel: int = 1  # replicas of the whole pipeline, each in a process of its own
    stage_layers: tuple[int, ...] | None = None  # layers per stage; default: balanced by cost
    offload: str = "off"  # off | auto | force: KV of micro-batches between their steps in host memory
    host_memory_gib: float | None = None  # host KV pool (offload, prefix cache's host tier), this node's stages together
    prefetch_gbs: float | None = None  # host -> GPU GB/s offload=auto's budget counts on; default: measured at start
    # KV cache storage: auto (the model's dtype) | fp8 (= fp8_e4m3) | fp8_e4m3 | fp8_e5m2. fp8 halves the
    # KV's bytes in VRAM, over PCIe and through attention (a float32 scale per stored row and KV head).
    kv_cache_dtype: str = "auto"
    prefix_caching: bool = True  # share the KV of full chunks of common prompt prefixes (GPU, then host tier)
    trace: str | None = None  # write a Chrome / Perfetto trace of each run here
    overwrite_trace: bool = False  # trace may replace a file that is not a trace (the CLI's --overwrite)

    def __post_init__(self):
        """Check every option before anything loads; ConfigError names the option at fault."""
        choices = {"dtype": ("auto", *DTYPES), "attention_backend": ("auto", "triton", "torch"),
                   "prefill_mode": ("mixed", "separate"), "pipeline_transport": PIPELINE_TRANSPORTS,
                   "offload": OFFLOAD_MODES, "kv_cache_dtype": KV_CACHE_DTYPES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "pipeline_parallel", "data_parallel"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ConfigError(name, f"must be a positive integer, got {getattr(self, name)!r}")
        tokens = self.chunk_tokens
        if not _is_int(tokens) or tokens & (tokens - 1) or not MIN_CHUNK_TOKENS <= tokens <= MAX_CHUNK_TOKENS:
            raise ConfigError("chunk_tokens", f"must be a power of two from {MIN_CHUNK_TOKENS} to {MAX_CHUNK_TOKENS}, "
                                              f"got {tokens!r}")
        if self.max_model_len is not None and (not _is_int(self.max_model_len) or self.max_model_len < 2):
            raise ConfigError("max_model_len", f"must be an integer >= 2 (prompt + output tokens), got "
                                               f"{self.max_model_len!r}; leave it out for the model's own limit")
        for name in ("gpu_memory_gib", "kv_cache_gib", "stage_timeout", "host_memory_gib", "prefetch_gbs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                unit = {"stage_timeout": "seconds", "prefetch_gbs": "GB/s"}.get(name, "GiB")
                raise ConfigError(name, f"must be a positive number of {unit}, got {value!r}")
        if not _is_int(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ConfigError("seed", f"must be an integer in [-2**63, 2**64 - 1], got {self.seed!r}")
        if self.stage_layers is not None:
            layers = self.stage_layers
            if isinstance(layers, str):  # "10,11,11", as the flag gives it
                try:
                    layers = tuple(int(part) for part in layers.split(","))
                except ValueError:
                    raise ConfigError("stage_layers", f"must be comma-separated layer counts such as 10,11,11, got "
                                                      f"{self.stage_layers!r}") from None
            if not all(_is_int(count) for count in layers):
                raise ConfigError("stage_layers", f"must be layer counts, got {self.stage_layers!r}")
            object.__setattr__(self, "stage_layers", tuple(layers))  # frozen: normalise in place
            if len(layers) != self.pipeline_parallel:
                raise ConfigError("stage_layers", f"names {len(layers)} stages but the pipeline has "
                                                  f"{self.pipeline_parallel} (set both)")
        if self.micro_batches is not None and (not _is_int(self.micro_batches) or
                                               not self.pipeline_parallel <= self.micro_batches <= 64):
            raise ConfigError("micro_batches", f"must be an integer from the number of stages ({self.pipeline_parallel}) "
                                               f"to 64, got {self.micro_batches!r}")
        if not isinstance(self.async_scheduling, bool):
            raise ConfigError("async_scheduling", f"must be True or False, got {self.async_scheduling!r}")
        if not isinstance(self.prefix_caching, bool):
            raise ConfigError("prefix_caching", f"must be True or False, got {self.prefix_caching!r}")
        if self.prefetch_gbs is not None and self.offload != "auto":
            raise ConfigError("prefetch_gbs", "sets offload=auto's prefetch budget: it does nothing with offload "
                                              f"{self.offload}")
        if self.host_memory_gib is not None:
            if self.offload == "off" and not self.prefix_caching:
                raise ConfigError("host_memory_gib", "sizes the host KV pool of offload and of the prefix cache's "
                                                     "host tier: set offload or prefix_caching too")
            available = available_host_memory_gib()
            if available is not None and self.host_memory_gib > available:
                raise ConfigError("host_memory_gib", f"of {self.host_memory_gib:g} is more than the {available:.1f} GiB "
                                                     "of host memory available now")
        if self.trace is not None:
            check_trace_path(self.trace, self.overwrite_trace)
        device = self.resolved_device()  # a device that does not exist fails here, before any weights load
        self._check_memory_budgets(device)
        self._check_kv_cache_dtype(device)

    def _check_kv_cache_dtype(self, device: torch.device) -> None:
        """fp8 KV needs a GPU that converts to and from fp8 in hardware (sm_89 and newer); the CPU
        runs it through the torch references."""
        if not self.kv_cache_dtype.startswith("fp8") or device.type != "cuda":
            return
        major, minor = torch.cuda.get_device_capability(device.index or 0)
        if (major, minor) < (8, 9):
            name = torch.cuda.get_device_name(device.index or 0)
            raise ConfigError("kv_cache_dtype", f"{self.kv_cache_dtype} needs a GPU with fp8 conversion (sm_89 or "
                                                f"newer: L4, L40S, RTX 4090, H100, ...); {name} is sm_{major}{minor}: "
                                                "use auto (the model's dtype)")

    def _check_memory_budgets(self, device: torch.device) -> None:
        """A budget larger than the memory there is fails now, not as an allocator error after the
        weights load. On the CPU the KV pool lives in host memory."""
        if device.type == "cpu":
            available = available_host_memory_gib()
            if self.kv_cache_gib is not None and available is not None and self.kv_cache_gib > available:
                raise ConfigError("kv_cache_gib", f"of {self.kv_cache_gib:g} is more than the {available:.1f} GiB of "
                                                  "host memory available now (on the CPU the KV cache is host memory)")
            return
        total = torch.cuda.get_device_properties(device.index or 0).total_memory / 2**30
        for name in ("gpu_memory_gib", "kv_cache_gib"):
            value = getattr(self, name)
            if value is not None and value > total:
                raise ConfigError(name, f"of {value:g} is more than the {total:.1f} GiB of {device}")

    def host_kv_bytes(self) -> int:
        """The host KV pool's bytes: host_memory_gib, or with offload a quarter of what is free. With
        offload off, the prefix cache's host tier gets a pool only when host_memory_gib is set."""
        if self.offload == "off" and self.host_memory_gib is None:
            return 0
        if self.host_memory_gib is not None:
            return int(self.host_memory_gib * 2**30)
        return int((available_host_memory_gib() or 4.0) * 2**30 / 4)

    @property
    def num_micro_batches(self) -> int:
        """Default M = P, the best measured: every extra micro-batch splits the batch further, and
        each micro-batch's step reads all of its stage's weights again (H100, Llama-3-8B shapes,
        128 x 512/256: P = 1 M = 1 6.1 s, M = 2 7.9 s; P = 2 in process M = 2 7.9 s, M = 3 10.3 s)."""
        return self.micro_batches if self.micro_batches is not None else self.pipeline_parallel

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError):
            device = None
        if device is None or device.type not in ("cpu", "cuda"):
            raise ConfigError("device", f"{self.device!r} is not a device PipeMax runs on: use auto, cpu, cuda or "
                                        "cuda:N")
        if device.type == "cuda":
            if torch.version.cuda is None:
                raise ConfigError("device", f"{self.device!r} is not available: this PyTorch build "
                                            f"({torch.__version__}) has no CUDA support; use cpu, or install a "
                                            "CUDA build of torch")
            if not torch.cuda.is_available():
                raise ConfigError("device", f"{self.device!r} is not available: no CUDA GPU is visible (driver, "
                                            "CUDA_VISIBLE_DEVICES); use cpu")
            count = torch.cuda.device_count()
            if device.index is not None and device.index >= count:
                raise ConfigError("device", f"{self.device!r} does not exist: this machine has {count} CUDA "
                                            f"device(s), cuda:0 to cuda:{count - 1}")
        return device

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32
        return DTYPES[self.dtype]

    def kv_storage(self) -> str:
        """What the KV pools hold (core/kv_dtype.py): the model's dtype name, or fp8_e4m3 / fp8_e5m2."""
        return kv_storage_name(self.kv_cache_dtype, str(self.resolved_dtype()).removeprefix("torch."))

    def resolved_kv_dtype(self) -> torch.dtype:
        return KV_TORCH_DTYPES[self.kv_storage()]
