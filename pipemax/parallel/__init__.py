"""parallel: how stages are placed and how step plans and activations reach them.

Owns
    pipeline.py      the transport interface (submit a plan, get pending tokens) and the in-process
                     transport: every stage in one process, taking turns on one device
    distributed.py   a process per stage joined by torch.distributed (NCCL on GPUs, gloo on CPU);
                     the stage ranks' serving loop
    processes.py     the processes started on one node: the __main__ guard, how a child ended or
                     is stopped, dying with the parent, signals left to the head
    cluster.py       under torchrun: the world of P x R ranks, rank roles, joining and leaving
    partition.py     the split of a model's layers into stages, balanced by weight

Add a transport here. May import: worker, core, models, kernels, torch. Never imports engine,
tuning, batch, api or cli: a transport carries plans; it does not make them.
"""
