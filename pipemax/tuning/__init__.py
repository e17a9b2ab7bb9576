"""tuning: what a server is and which settings suit it. `pipemax autotune` and `pipemax plan`.

Owns
    hardware.py          the server probe (NVML: GPUs, PCIe, NVLink, driver; host memory, cores)
    microbench.py        what this server's links and GPUs really do (copies, step costs)
    server_profile.py    autotune's per-server profiles: keyed JSON, refused for another server
    server_plan.py       choosing chunk size, micro-batches, offload for a server; predicted figures.
                         Change a planner figure here.
    simulator.py         a schedule (core.offload_schedule) timed on a modelled server
    workloads.py         request shapes for planning and benchmarks
    autotune.py          the `pipemax autotune` command
    plan_command.py      the `pipemax plan` command
    profile_settings.py  serve-offline's settings: a flag, else the saved profile, else the default

May import: engine (autotune runs it to measure; server profiles sit beside its saved step costs),
parallel, worker, core, models, kernels. The engine never imports tuning: it takes the settings
tuning chose as plain options.
"""
