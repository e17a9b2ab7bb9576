"""Everything that moves:

    scheduler.py     decides: which sequences run in the next step, chunked prefill, preemption
    kv_manager.py    counts: chunk ids per sequence, residency (GPU / host / in flight), no tensors
    kv_pool.py       owns the KV tensors (GPU pool, pinned host pool) and runs copies between them
    kv_transfers.py  a stage's prefetch / offload / write-back copies on their own streams, by events
    cost_model.py    a step's predicted time (alpha tokens + beta context + delta), fitted online,
                     saved after a run and seeding the next (step-cost profiles)
    prefetch_budget.py  how much KV offload=auto may keep on the host per micro-batch
    residency_plan.py   offload=auto's decisions as a pure function: greedy fill, refinement
    offload_schedule.py the engine's whole schedule without tensors: workload in, rounds out
    timeline.py      what ran when: the hidden share of copy time, and --trace
    device_tables.py a stage's chunk tables on its device, updated by changed chunks only;
                     one packed upload per step, positions and slots derived on the device
    model_runner.py  builds a step's tensors and attention metadata, runs the model
    cuda_graphs.py   decode steps replayed from CUDA graphs, one per batch bucket
    piecewise_graphs.py  steps with prefill: graphs captured piecewise around attention
    sampling.py      SamplingParams, penalties, the sampler
    step_plan.py     the record a step sends every stage (KV operations replayed, not tables)
    stage.py         one pipeline stage: layers, KV pool and manager, sampler on the last
    pipeline.py      the transport interface; in-process stages taking turns on one device
    distributed.py   a process per stage (spawned on one node, or ranks under torchrun)
    data_parallel.py R replicas of the pipeline, results into one stream
    cluster.py       under torchrun: the world of P x R ranks, rank roles, joining and leaving
    engine.py        the loop: schedule -> run -> sample -> stop checks
    hardware.py      the server probe (NVML: GPUs, PCIe, NVLink, driver; host memory, cores)
    server_profile.py  autotune's per-server profiles: keyed JSON, refused for another server
    simulator.py     a schedule timed on a modelled server: throughput, stage utilisation, PCIe

Imports point down: runtime may import models and kernels, never cli or the API.
"""
