"""engine: the loop that drives a pipeline, and its options.

Owns
    llm_engine.py     LLMEngine: schedule a micro-batch -> submit it to the pipeline -> read the
                      oldest step's tokens later -> stop checks -> finished requests
    config.py         EngineConfig, every option checked before anything loads
    step_costs.py     the cost model's fit saved after a run and seeding the next engine
    cpu_threads.py    torch's thread count for a single-process CPU engine (half the cores)
    data_parallel.py  R replicas of the engine (one process each, or torchrun's), one result stream

May import: parallel, worker, core, models, kernels. Never imports tuning, batch, api or cli, nor
the package top (`pipemax.__version__`): what the engine needs is passed in or computed below.
"""
