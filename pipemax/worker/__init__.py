"""worker: one pipeline stage on one device. Owns the tensors, the streams and the graphs.

Owns
    stage.py             StageExecutor: a stage's layers, KV pool, replayed KV manager, and the sampler
                         on the last stage; applies a step plan and runs it
    model_runner.py      a step's batch tensors and attention metadata, then the model's layers
    device_tables.py     chunk tables kept on the device, updated by changed chunks only
    cuda_graphs.py       decode steps replayed from CUDA graphs, one per batch bucket
    piecewise_graphs.py  steps with prefill pieces: graphs captured around attention
    kv_pool.py           the KV tensors (GPU pool, pinned host pool) behind core's chunk ids
    kv_transfers.py      prefetch / offload / write-back copies on their own streams, ordered by events.
                         Change how bytes move here (what moves is decided in core).
    memory_budget.py     how much of a device's memory is left for the KV cache
    sampling.py          the sampler on the device: penalties, Gumbel-max with Philox noise, logprobs
    timeline.py          what ran when on this device: hidden copy time, --trace

May import: core, models, kernels (kernels._common too: the tile choices and device guard the
launchers use, which graph capture must repeat), torch, triton. Never imports parallel, engine, tuning, batch,
api or cli: a stage does not know how it is placed or who drives it. It decides nothing either:
it replays what core decided (step plans and their KV operations).
"""
