"""The engine loop on one device: schedule -> run the model -> sample -> finish or continue.

    plan = scheduler.schedule()          which sequences, how many tokens each
    logits = runner.execute(plan)        build tensors, run the layers, logits of sampling rows
    tokens = sample(logits, ...)         per-request parameters and seeds
    _append_token(...)                   stop conditions; finished sequences free their KV
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from pipemax.models import LlamaFamilyModel, ModelConfig, load_model, load_model_config
from pipemax.models.loader import find_weights

from .kv_manager import KVManager
from .kv_pool import MAX_CHUNK_TOKENS, MIN_CHUNK_TOKENS, KVPool, KVPoolSpec
from .model_runner import ModelRunner
from .sampling import SEED_RANGE, SamplingParams, apply_penalties, make_generator, sample
from .scheduler import Scheduler
from .sequence import Sequence

log = logging.getLogger("pipemax")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ConfigError(ValueError):
    """An engine option with a value PipeMax cannot use; `option` is the EngineConfig field."""

    def __init__(self, option: str, problem: str):
        super().__init__(f"{option} {problem}")
        self.option, self.problem = option, problem


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
    cuda_graphs: bool = True  # decode steps replay CUDA graphs (CUDA with the Triton backend only)

    def __post_init__(self):
        """Check every option before anything loads; ConfigError names the option at fault."""
        choices = {"dtype": ("auto", *DTYPES), "attention_backend": ("auto", "triton", "torch"),
                   "prefill_mode": ("mixed", "separate")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ConfigError(name, f"must be a positive integer, got {getattr(self, name)!r}")
        tokens = self.chunk_tokens
        if not _is_int(tokens) or tokens & (tokens - 1) or not MIN_CHUNK_TOKENS <= tokens <= MAX_CHUNK_TOKENS:
            raise ConfigError("chunk_tokens", f"must be a power of two from {MIN_CHUNK_TOKENS} to {MAX_CHUNK_TOKENS}, "
                                              f"got {tokens!r}")
        if self.max_model_len is not None and (not _is_int(self.max_model_len) or self.max_model_len < 2):
            raise ConfigError("max_model_len", f"must be an integer >= 2 (prompt + output tokens), got "
                                               f"{self.max_model_len!r}; leave it out for the model's own limit")
        for name in ("gpu_memory_gib", "kv_cache_gib"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value <= 0):
                raise ConfigError(name, f"must be a positive number of GiB, got {value!r}")
        if not _is_int(self.seed) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ConfigError("seed", f"must be an integer in [-2**63, 2**64 - 1], got {self.seed!r}")
        self.resolved_device()  # a device that does not exist fails here, before any weights load

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


@dataclass
class FinishedRequest:
    seq_id: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    finish_reason: str
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    stop_text_end: int | None = None  # where a matched stop string starts in the output text
    num_preemptions: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer=None, model: LlamaFamilyModel | None = None):
        """Loads config.model, unless a built model (with weights, on the device) is given:
        benchmarks pass random-weight models of real shapes that way."""
        self.config = config
        self.device = config.resolved_device()
        self.dtype = config.resolved_dtype()
        self.tokenizer = tokenizer
        path = Path(config.model)
        if model is None:
            kind, source = find_weights(path)
            self.model_config: ModelConfig = (
                load_model_config(source.parent, gguf_file=source.name) if kind == "gguf" else load_model_config(path)
            )
            model = load_model(path, device=self.device, dtype=self.dtype, config=self.model_config)
        else:
            self.model_config = model.config
        self.model = model
        self.eos_token_ids = self._eos_token_ids(path)

        spec = KVPoolSpec(self.model_config.num_layers, self.model_config.num_kv_heads, self.model_config.head_dim,
                          config.chunk_tokens, self.dtype)
        kv_bytes = self._kv_budget_bytes()
        num_chunks = spec.chunks_in(kv_bytes)
        max_len = self.model_config.max_model_len
        if config.max_model_len is not None and config.max_model_len > max_len:
            log.warning("max_model_len %d is above this model's limit of %d tokens: using %d",
                        config.max_model_len, max_len, max_len)
        elif config.max_model_len is not None:
            max_len = config.max_model_len
        if num_chunks * config.chunk_tokens < max_len:
            if num_chunks < 1:
                raise ConfigError("kv_cache_gib", f"leaves a KV budget of {kv_bytes / 2**30:.2f} GiB, less than one "
                                                  f"chunk of {spec.chunk_bytes / 2**20:.2f} MiB: give the KV cache more")
            log.warning("KV pool holds %d tokens: max_model_len lowered from %d", num_chunks * config.chunk_tokens, max_len)
            max_len = num_chunks * config.chunk_tokens
        self.max_model_len = max_len
        backend = config.attention_backend
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "torch"
        self.kv_pool = KVPool(spec, num_chunks, 0, self.device, backend)
        self.kv = KVManager(num_chunks, 0, config.chunk_tokens)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens, config.prefill_mode)
        self.runner = ModelRunner(self.model, self.kv_pool, self.kv, backend)
        if config.cuda_graphs and self.device.type == "cuda" and backend == "triton":
            self.runner.enable_cuda_graphs(config.max_num_seqs, self.max_model_len)
        # Unseeded random rows draw on the device, so sampling costs no host round trip.
        self.batch_generator = torch.Generator(device=self.device).manual_seed(config.seed)
        self._ids = itertools.count()
        self.num_steps = 0

    # ---- setup helpers -----------------------------------------------------------------------
    def _kv_budget_bytes(self) -> int:
        config = self.config
        if config.kv_cache_gib is not None:
            return int(config.kv_cache_gib * 2**30)
        if self.device.type != "cuda":
            return 2**30
        if config.gpu_memory_gib:
            budget = int(config.gpu_memory_gib * 2**30)
        else:  # 90% of what is free now (other processes, the weights already loaded count)
            free_now, _ = torch.cuda.mem_get_info(self.device)
            budget = int(0.9 * (free_now + torch.cuda.memory_allocated(self.device)))
        weights = self.model_config.weight_bytes(self.dtype)
        # Activations of the largest step: hidden states, q/k/v, the MLP's intermediate, fp32 logits.
        mc, element = self.model_config, torch.tensor([], dtype=self.dtype).element_size()
        per_token = (4 * mc.hidden_size + mc.q_size + 2 * mc.kv_size + 3 * mc.intermediate_size) * element
        activations = config.max_num_batched_tokens * per_token + config.max_num_seqs * mc.vocab_size * 4 * 2
        # cuBLAS workspaces, the CUDA-graph pool, allocator fragmentation.
        free = budget - weights - activations - 1536 * 2**20
        if free <= 0:
            raise ConfigError("gpu_memory_gib", f"of {budget / 2**30:.1f} leaves no room for a KV cache after "
                                                f"{weights / 2**30:.1f} GiB of weights: give PipeMax more memory")
        return free

    def _eos_token_ids(self, path: Path) -> set[int]:
        ids: set[int] = set()

        def add(value):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(v for v in value if isinstance(v, int))

        add(getattr(self.model_config.hf_config, "eos_token_id", None))
        generation_config = path / "generation_config.json" if path.is_dir() else None
        if generation_config and generation_config.exists():
            import json

            add(json.loads(generation_config.read_text()).get("eos_token_id"))
        if self.tokenizer is not None:
            add(self.tokenizer.eos_token_id)
        return ids

    # ---- requests ----------------------------------------------------------------------------
    def check_prompt(self, prompt_token_ids: list[int]) -> None:
        """Raise ValueError for a prompt this engine cannot serve."""
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_token_ids)} tokens; the maximum context is "
                             f"{self.max_model_len} tokens, output included")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad!r} is outside the vocabulary [0, {vocab})")

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        self.check_prompt(prompt_token_ids)
        seq_id = next(self._ids)
        self.scheduler.add(Sequence(seq_id, list(prompt_token_ids), params, generator=make_generator(params)))
        return seq_id

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def abort_all(self) -> None:
        """Drop every unfinished request and free its KV (after an interrupted run)."""
        self.scheduler.abort_all()

    def step(self) -> list[FinishedRequest]:
        plan = self.scheduler.schedule()
        logits = self.runner.execute(plan)
        sampling = [entry for entry in plan.scheduled if entry.samples]
        for entry in plan.scheduled:
            entry.seq.num_computed_tokens = entry.end
        params = [e.seq.params for e in sampling]
        processed = None
        if any(p.has_penalties for p in params):
            histories = [(e.seq.prompt_token_ids, e.seq.output_token_ids) for e in sampling]
            processed = apply_penalties(logits, params, histories, self.eos_token_ids)
        tokens, logprobs, top_logprobs = sample(logits, params, [e.seq.generator for e in sampling],
                                                self.batch_generator, processed)
        finished = []
        for index, entry in enumerate(sampling):
            seq = entry.seq
            seq.token_ids.append(tokens[index])
            if seq.params.logprobs:
                seq.output_logprobs.append(logprobs[index])
            if seq.params.top_logprobs:
                seq.output_top_logprobs.append(top_logprobs[index])
            if self._check_stop(seq):
                self.scheduler.finish(seq)
                finished.append(FinishedRequest(
                    seq.seq_id, seq.prompt_token_ids, seq.output_token_ids, seq.finish_reason,
                    seq.output_logprobs if seq.params.logprobs else None,
                    seq.output_top_logprobs if seq.params.top_logprobs else None, seq.stop_text_end, seq.num_preemptions,
                ))
        self.num_steps += 1
        return finished

    def run(self) -> Iterator[FinishedRequest]:
        """Step until every added request has finished, yielding each as it finishes."""
        while self.has_unfinished():
            yield from self.step()

    def _check_stop(self, seq: Sequence) -> bool:
        params = seq.params
        token = seq.token_ids[-1]
        if token in params.stop_token_ids or (token in self.eos_token_ids and not params.ignore_eos):
            seq.finish_reason = "stop"
        elif params.stop and self._stop_string_end(seq) is not None:
            seq.finish_reason = "stop"
        elif seq.num_output_tokens >= params.max_tokens or len(seq.token_ids) >= self.max_model_len:
            seq.finish_reason = "length"
        return seq.finish_reason is not None

    def _stop_string_end(self, seq: Sequence) -> int | None:
        """Character offset in the output text where the first stop string starts, if one has appeared."""
        if self.tokenizer is None:
            return None
        longest = max(len(stop.encode()) for stop in seq.params.stop)
        # A stop string that completes with the newest token lies within its last `longest` tokens
        # plus a few: byte-level tokens carry at least one byte, and a few spare tokens cover
        # special tokens that decode to nothing and a split character at the window's start.
        window_start = max(seq.num_prompt_tokens, len(seq.token_ids) - (longest + 4))
        tail = self.tokenizer.decode(seq.token_ids[window_start:], skip_special_tokens=True)
        if not any(stop in tail for stop in seq.params.stop):
            return None
        text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
        positions = [text.find(stop) for stop in seq.params.stop if stop in text]
        seq.stop_text_end = min(positions)
        return seq.stop_text_end
