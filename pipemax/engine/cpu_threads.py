"""How many threads torch runs a single-process CPU engine's steps with.

torch starts with a thread per core. Its OpenMP threads meet at the end of every op and spin while
they wait; when another job holds one of the cores, every op waits a scheduler slice for the
thread that lost it, and a run collapses. Measured on the 2-core CPU machine with SmolLM2-135M
(the steps' own seconds, `stage busy ... of X s`, then the whole command's):

    6 requests of examples/requests.jsonl      1 thread           2 threads
    idle machine (load 0.4)                    7.7 s (18 s)       7.3 s (15 s)
    beside other jobs (load 1.5 to 4.5)        9.7-15 s (17-25 s) 127 s (143 s)
    beside 2 CPU-bound processes as well       12 s (25 s)        453 s (499 s)
    make demo, fresh cache (load 2)            8.3-9.1 s (36-38 s, first result at 28-31 s)
                                                                  28 s (57 s, first result at 32 s)

So half the cores: one thread on a 2-core machine gives up 5% of the step time when the machine
is idle and wins 3x to 37x when it is not. Machines with more cores were not measured; half of
them keeps the same headroom for the neighbours. Stage processes and data-parallel replicas split
the cores among themselves instead (parallel/distributed.share_cpu_cores,
engine/data_parallel.replica_main).
"""

from __future__ import annotations

import os

import torch

# torch's count when this module was first imported: a different count later means that this
# process chose its own (a data-parallel replica's share of the cores, a caller's
# torch.set_num_threads), which the engine keeps.
_THREADS_AT_IMPORT = torch.get_num_threads()


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_cpu_threads(cores: int) -> int:
    """Half the cores, at least one (measurements above)."""
    return max(1, cores // 2)


def choose_cpu_threads(environ: dict, cores: int, threads_now: int, threads_at_import: int) -> int | None:
    """The thread count a single-process CPU engine should set, or None to leave torch's alone:
    the user chose one (OMP_NUM_THREADS), or this process already did."""
    if environ.get("OMP_NUM_THREADS", "").strip():
        return None
    if threads_now != threads_at_import:
        return None
    return default_cpu_threads(cores)


def use_cpu_threads() -> int:
    """Applies choose_cpu_threads to this process; returns torch's thread count from now on."""
    threads = choose_cpu_threads(os.environ, usable_cores(), torch.get_num_threads(), _THREADS_AT_IMPORT)
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
