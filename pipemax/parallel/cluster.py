"""Running under torchrun: several nodes, every rank started by torchrun with the same command.

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m pipemax serve-offline ... --pipeline-parallel 4 --data-parallel 2

The world is R replicas x P stages (WORLD_SIZE must equal P x R). Rank k belongs to replica
k // P as its stage k % P; a replica's stage 0 is its head (scheduler + stage 0). Rank 0 is
replica 0's head and runs the job: it reads the input, hands requests to the replicas and writes
the one output file. Other heads serve the batches rank 0 sends; other ranks are stage
processes, which receive their StageSpec from their head instead of being spawned. Each rank
uses cuda:LOCAL_RANK (or the CPU); nodes are taken to be alike (a head sizes its stages' KV
pools from its own GPU).

Messages go over one gloo group spanning the world; activations over the default group (NCCL
between GPUs). A rank that dies breaks its peers' connections, which ends the job with an error
naming it; torchrun then stops every rank on every node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from pipemax.core.errors import ConfigError


@dataclass
class Cluster:
    rank: int
    world_size: int
    local_rank: int
    stages: int  # P
    replicas: int  # R
    on_cpu: bool = False  # --device cpu: gloo everywhere, even where there are GPUs
    mailbox: object = None  # distributed.Mailbox on a world-wide gloo group

    @property
    def head(self) -> int:
        """The head rank of this rank's replica."""
        return self.rank - self.rank % self.stages

    @property
    def is_head(self) -> bool:
        return self.rank % self.stages == 0

    def device(self) -> torch.device:
        if self.on_cpu or not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device(f"cuda:{self.local_rank}")


_cluster: Cluster | None = None


def launched_by_torchrun() -> bool:
    """torchrun sets TORCHELASTIC_RUN_ID for its workers; a world of one is a plain run."""
    return "TORCHELASTIC_RUN_ID" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def current_cluster() -> Cluster | None:
    return _cluster


def join_cluster(pipeline_parallel: int, data_parallel: int, device: str = "auto") -> Cluster:
    """Join torchrun's world (once per process) and check it is P x R ranks."""
    global _cluster
    if _cluster is not None:
        return _cluster
    from .distributed import MAILBOX_TIMEOUT, Mailbox, init_world, share_cpu_cores

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if pipeline_parallel * data_parallel != world:
        raise ConfigError("pipeline_parallel", f"{pipeline_parallel} x --data-parallel {data_parallel} = "
                                               f"{pipeline_parallel * data_parallel} ranks, but torchrun started "
                                               f"{world}: set them so that P x R = WORLD_SIZE")
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError("device", f"{device!r}: under torchrun each rank uses cuda:LOCAL_RANK; give auto, "
                                    "cuda or cpu")
    cluster = Cluster(rank, world, local_rank, pipeline_parallel, data_parallel, on_cpu=device == "cpu")
    device = cluster.device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL binds this rank to a device
        backend = "nccl"
    else:
        backend = "gloo"
        share_cpu_cores(int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    # The job's own watchdog is the head's --stage-timeout; the transport only needs to outlast
    # the slowest start (a large model loading on another node).
    init_world(backend, init_method="env://", rank=rank, world_size=world,
               timeout=timedelta(hours=2))
    cluster.mailbox = Mailbox(dist.new_group(backend="gloo", timeout=MAILBOX_TIMEOUT))
    _cluster = cluster
    return cluster


def leave_cluster() -> None:
    global _cluster
    if _cluster is not None and dist.is_initialized():
        try:
            _cluster.mailbox.flush(timeout=10)  # the job is done: a peer that left takes nothing more
            dist.destroy_process_group()
        except Exception:
            pass
    _cluster = None
