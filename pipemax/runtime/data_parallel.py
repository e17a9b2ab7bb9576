"""Data parallelism: R replicas of the whole engine (each a pipeline of P stages), one process each.

8 GPUs = PP 4 x DP 2: replica r runs on cuda:r*P .. cuda:r*P+P-1 (every replica on the CPU where
there is no GPU). This process only hands out requests and collects results: each request goes
to the replica with the least work outstanding (prompt + max tokens), results come back as the
replicas finish them, and the caller (the batch job) writes them into one output file, so resume
works as with one replica. `DataParallelEngine` answers the calls LLM makes of an engine.

Replicas die with this process (PR_SET_PDEATHSIG). A replica that dies ends the run with an
error naming it; an interrupted run leaves the replicas mid-work, so the engine is then closed
and a new LLM is needed (the batch job simply exits, and its rerun resumes).
"""

from __future__ import annotations

import dataclasses
import os
import queue
import signal
import time
from collections.abc import Iterator

import torch
import torch.multiprocessing as mp

from .distributed import StageFailure, _die_with_parent, _exit_reason
from .engine import LLMEngine, check_prompt_ids
from .engine_config import ConfigError, EngineConfig


def replica_configs(config: EngineConfig) -> list[EngineConfig]:
    device = config.resolved_device()
    replicas, stages = config.data_parallel, config.pipeline_parallel
    if device.type != "cuda":
        return [dataclasses.replace(config, data_parallel=1, device="cpu") for _ in range(replicas)]
    first, count = device.index or 0, torch.cuda.device_count()
    if first + replicas * stages > count:
        raise ConfigError("data_parallel", f"{replicas} replicas of {stages} stage(s) need {replicas * stages} GPUs "
                                           f"from cuda:{first}, but this machine has {count}")
    return [dataclasses.replace(config, data_parallel=1, device=f"cuda:{first + r * stages}") for r in range(replicas)]


class DataParallelEngine:
    def __init__(self, config: EngineConfig, tokenizer=None):
        self.config = config
        self.tokenizer = tokenizer
        configs = replica_configs(config)
        context = mp.get_context("spawn")
        self.outbox = context.Queue()
        self.inboxes = [context.Queue() for _ in configs]
        self.broken = False
        self.processes = []
        for rank, replica_config in enumerate(configs):
            # Not daemonic: a replica with stage processes has children of its own.
            process = context.Process(target=replica_main, name=f"pipemax-replica-{rank}",
                                      args=(rank, replica_config, tokenizer, self.inboxes[rank], self.outbox,
                                            os.getpid(), len(configs)))
            process.start()
            self.processes.append(process)
        self.devices = [c.device for c in configs]
        try:
            ready = {}
            while len(ready) < len(configs):  # loading takes as long as it takes: only deaths end the wait
                rank, kind, *rest = self._next(None, "loading")
                if kind != "ready":
                    raise StageFailure(f"replica {rank} on {self.devices[rank]} failed to start: {rest[0]}")
                ready[rank] = rest
        except BaseException:
            self.close()
            raise
        self.max_model_len = min(limit for limit, _ in ready.values())
        self.vocab_size = next(iter(ready.values()))[1]
        self._pending: list[tuple[int, list[int], object]] = []
        self._ids = 0
        self.num_steps = 0
        self.last_run_stats: dict = {}

    # ---- what LLM asks of an engine ----------------------------------------------------------
    def check_prompt(self, prompt_token_ids: list[int]) -> None:
        check_prompt_ids(prompt_token_ids, self.max_model_len, self.vocab_size)

    def add_request(self, prompt_token_ids: list[int], params) -> int:
        self.check_prompt(prompt_token_ids)
        seq_id, self._ids = self._ids, self._ids + 1
        self._pending.append((seq_id, list(prompt_token_ids), params))
        return seq_id

    def has_unfinished(self) -> bool:
        return bool(self._pending)

    def run(self) -> Iterator:
        """Hand out the added requests, balanced by work, and yield results as replicas finish them."""
        if self.broken:
            raise StageFailure("the replicas were stopped by an earlier interruption or failure: start a new LLM")
        load = [0] * len(self.processes)
        batches: list[list] = [[] for _ in self.processes]
        for request in sorted(self._pending, key=lambda r: -(len(r[1]) + r[2].max_tokens)):
            rank = load.index(min(load))
            batches[rank].append(request)
            load[rank] += len(request[1]) + request[2].max_tokens
        self._pending = []
        busy = set()
        for rank, batch in enumerate(batches):
            if batch:
                self.inboxes[rank].put(batch)
                busy.add(rank)
        stats = {}
        self.broken = True  # until every replica is idle again: an interruption leaves them mid-work
        while busy:
            rank, kind, *rest = self._next(self.config.stage_timeout, "running")
            if kind == "done":
                yield rest[0]
            elif kind == "idle":
                busy.discard(rank)
                stats[rank] = rest[0]
            elif kind == "error":
                raise StageFailure(f"replica {rank} on {self.devices[rank]} failed: {rest[0]}")
        self.broken = False
        self.num_steps += sum(s.get("steps", 0) for s in stats.values())
        self.last_run_stats = {"replicas": [stats[r] for r in sorted(stats)], "steps": self.num_steps}

    def abort_all(self) -> None:
        self._pending = []
        if self.broken:  # replicas are mid-work: stop them; the results written so far stay
            self.close()

    def close(self) -> None:
        for inbox, process in zip(self.inboxes, self.processes):
            if process.is_alive() and not self.broken:
                inbox.put(None)
        deadline = time.monotonic() + (0 if self.broken else 10)
        for process in self.processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        self.processes, self.broken = [], True

    def _next(self, silence_limit: float | None, doing: str):
        """The next message of any replica, watching that every replica lives."""
        deadline = None if silence_limit is None else time.monotonic() + silence_limit
        while True:
            try:
                return self.outbox.get(timeout=0.05)
            except queue.Empty:
                pass
            for rank, process in enumerate(self.processes):
                if not process.is_alive():
                    self.broken = True
                    raise StageFailure(f"replica {rank} on {self.devices[rank]} {_exit_reason(process.exitcode)} "
                                       f"while {doing}")
            if deadline is not None and time.monotonic() > deadline:
                self.broken = True
                raise StageFailure(f"no result from any replica for {silence_limit:g} s while {doing} "
                                   "(--stage-timeout): a replica hangs")


def replica_main(rank: int, config: EngineConfig, tokenizer, inbox, outbox, parent_pid: int, replicas: int) -> None:
    """One replica: an engine (with its own stage processes when pipelined) serving batches."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    if config.resolved_device().type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // replicas))
    try:
        engine = LLMEngine(config, tokenizer=tokenizer)
    except Exception as error:
        outbox.put((rank, "failed", f"{type(error).__name__}: {error}"))
        return
    outbox.put((rank, "ready", engine.max_model_len, engine.model_config.vocab_size))
    try:
        while (batch := inbox.get()) is not None:
            parent_id = {}
            for seq_id, token_ids, params in batch:
                parent_id[engine.add_request(token_ids, params)] = seq_id
            for result in engine.run():
                result.seq_id = parent_id[result.seq_id]
                outbox.put((rank, "done", result))
            outbox.put((rank, "idle", engine.last_run_stats))
    except Exception as error:
        outbox.put((rank, "error", f"{type(error).__name__}: {error}"))
    finally:
        engine.close()
