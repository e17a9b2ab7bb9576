"""core: the host's decisions, as plain Python. No torch, no tensors, no devices.

Owns
    scheduler.py         continuous batching: who runs in the next step, chunked prefill, preemption,
                         micro-batch groups, which requests are host-resident (calls residency_plan)
    sequence.py          a request as the scheduler tracks it
    sampling_params.py   SamplingParams: what a request asks of the sampler (a checked record)
    kv_chunks.py         chunk ids of one pool: states and a deterministic free list
    kv_manager.py        chunk tables per sequence and where each sequence's KV lives (GPU / host /
                         staged): the counting, never the bytes
    kv_prefix_cache.py   shared prefix chunks: references, LRU eviction, the host tier
    prefix_index.py      which full chunks hold which token prefixes
    prefix_sharing.py    the scheduler's side of prefix caching (hits, demand, deferral)
    prefix_order.py      prefix-aware order of an offline batch, balanced groups
    residency_plan.py    offload=auto's residency rule: greedy fill of the prefetch budget, then swaps
                         that balance micro-batches. Change a residency rule here.
    prefetch_budget.py   bytes each micro-batch may prefetch (link bandwidth x predicted compute)
    cost_model.py        a step's predicted time, T = alpha tokens + beta context + delta, fitted online
    offload_schedule.py  the engine's whole schedule as a pure function (what the simulator times)
    step_plan.py         the record a step sends every stage; KV operations logged to be replayed
    kv_dtype.py          KV cache dtypes: names, bytes per element, per token and per chunk (with fp8's
                         per-row scales)
    errors.py            ConfigError, the one-line error for a bad option

May import: the standard library and other modules of core. Never imports torch, numpy, triton or
any other pipemax package (tests/test_layout.py checks it), so every decision is testable and
replayable without a device, and the same decisions drive every stage.
"""
