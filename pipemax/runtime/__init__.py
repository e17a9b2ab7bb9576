"""Everything that moves, on one device so far:

    scheduler.py     decides: which sequences run in the next step, chunked prefill, preemption
    kv_manager.py    counts: chunk ids per sequence, residency (GPU / host / in flight), no tensors
    kv_pool.py       owns the KV tensors (GPU pool, pinned host pool) and runs copies between them
    model_runner.py  builds a step's tensors and attention metadata, runs the model
    cuda_graphs.py   decode steps replayed from CUDA graphs, one per batch bucket
    sampling.py      SamplingParams, penalties, the sampler
    engine.py        the loop: schedule -> run -> sample -> stop checks

Imports point down: runtime may import models and kernels, never cli or the API.
"""
