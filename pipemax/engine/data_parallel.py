"""Data parallelism: R replicas of the whole engine (each a pipeline of P stages), one process each.

8 GPUs = PP 4 x DP 2: replica r runs on cuda:r*P .. cuda:r*P+P-1 (every replica on the CPU where
there is no GPU). This process only hands out requests and collects results: each request goes
to the replica with the least work outstanding (prompt + max tokens), results come back as the
replicas finish them, and the caller (the batch job) writes them into one output file, so resume
works as with one replica. `DataParallelEngine` answers the calls LLM makes of an engine.

Replicas die with this process (PR_SET_PDEATHSIG). A replica that dies ends the run with an
error naming it; an interrupted run leaves the replicas mid-work, so the engine is then closed
and a new LLM is needed (the batch job simply exits, and its rerun resumes).

Under torchrun (cluster.py) the replicas are groups of ranks: replica 0 runs on a thread of rank
0 (this process heads it), replica r is served by its head rank r x P over the world's gloo
group. The hand-out, the results and the failure rules are the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator

import torch
import torch.multiprocessing as mp

from pipemax.core.prefix_order import balance_groups, group_by_prefix
from pipemax.parallel.cluster import Cluster, current_cluster, leave_cluster
from pipemax.parallel.distributed import StageFailure, _die_with_parent, _exit_reason

from .config import ConfigError, EngineConfig
from .llm_engine import LLMEngine, check_prompt_ids


def replica_configs(config: EngineConfig) -> list[EngineConfig]:
    device = config.resolved_device()
    replicas, stages = config.data_parallel, config.pipeline_parallel
    if config.offload != "off" or config.host_memory_gib is not None:
        # One node's host pool, pinned once: each replica gets its share, not the whole.
        config = dataclasses.replace(config, host_memory_gib=config.host_kv_bytes() / 2**30 / replicas)
    if device.type != "cuda":
        return [dataclasses.replace(config, data_parallel=1, device="cpu") for _ in range(replicas)]
    first, count = device.index or 0, torch.cuda.device_count()
    if first + replicas * stages > count:
        raise ConfigError("data_parallel", f"{replicas} replicas of {stages} stage(s) need {replicas * stages} GPUs "
                                           f"from cuda:{first}, but this machine has {count}")
    return [dataclasses.replace(config, data_parallel=1, device=f"cuda:{first + r * stages}") for r in range(replicas)]


class ProcessReplica:
    """A replica in a process of its own, spawned on this node."""

    def __init__(self, index: int, config: EngineConfig, tokenizer, outbox, replicas: int):
        self.name = f"replica {index} on {config.device}"
        context = mp.get_context("spawn")
        self.inbox = context.Queue()
        # Not daemonic: a replica with stage processes has children of its own.
        self.process = context.Process(target=replica_main, name=f"pipemax-replica-{index}",
                                       args=(index, config, tokenizer, self.inbox, outbox, os.getpid(), replicas))
        self.process.start()

    def send(self, batch) -> None:
        self.inbox.put(batch)

    def failure(self) -> str | None:
        return None if self.process.is_alive() else _exit_reason(self.process.exitcode)

    def join(self, timeout: float) -> None:
        self.process.join(timeout=timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)


class ThreadReplica:
    """Under torchrun, replica 0: rank 0 heads it, on a thread beside the job."""

    def __init__(self, index: int, config: EngineConfig, tokenizer, outbox, device: torch.device):
        self.name = f"replica {index} on rank 0"
        self.inbox: queue.Queue = queue.Queue()

        def main() -> None:
            if device.type == "cuda":
                torch.cuda.set_device(device)  # the current device is per thread
            serve_batches(index, lambda: LLMEngine(config, tokenizer=tokenizer), self.inbox.get, outbox.put)

        self.thread = threading.Thread(target=main, name=f"pipemax-replica-{index}", daemon=True)
        self.thread.start()

    def send(self, batch) -> None:
        self.inbox.put(batch)

    def failure(self) -> str | None:
        return None if self.thread.is_alive() else "stopped"

    def join(self, timeout: float) -> None:
        self.thread.join(timeout=timeout)  # a thread cannot be killed: a stuck one dies with the process


class RemoteReplica:
    """Under torchrun, replica r served by its head rank; its messages come in on a thread."""

    def __init__(self, index: int, cluster: Cluster, outbox):
        self.head = index * cluster.stages
        self.name = f"replica {index} on rank {self.head}"
        self.mailbox = cluster.mailbox
        self.stopped = False
        self.ended: str | None = None  # why the head's messages stopped

        def receive_forever() -> None:
            while True:
                try:
                    message = self.mailbox.receive(self.head)
                except BaseException as error:  # the head rank is gone
                    if not self.stopped:
                        outbox.put((index, "error", f"lost the connection ({error})"))
                    self.ended = "lost its connection"
                    return
                outbox.put(message)
                if message[1] in ("closed", "failed"):
                    self.ended = "stopped"
                    return

        self.receiver = threading.Thread(target=receive_forever, name=f"pipemax-replica-{index}", daemon=True)
        self.receiver.start()

    def send(self, batch) -> None:
        self.stopped = batch is None
        try:
            self.mailbox.send(batch, self.head)
        except RuntimeError as error:  # the head rank is gone
            raise StageFailure(f"{self.name} is gone ({error})") from None

    def failure(self) -> str | None:
        # A lost rank shows first as an "error" message; this is for the watch after it.
        return None if self.stopped else self.ended

    def join(self, timeout: float) -> None:
        """Wait for the head's last message ("closed"): leaving before it would break its send."""
        self.receiver.join(timeout=timeout)


def split_requests(requests: list, replicas: int, chunk_tokens: int | None) -> list[list]:
    """(seq_id, token ids, params) requests spread over replicas, balanced by work (prompt and
    output tokens). With prefix caching (chunk_tokens given), requests sharing a prefix go to one
    replica, whose cache computes it once, unless their group is more than a replica's share
    (prefix_order.balance_groups)."""
    weights = [len(ids) + params.max_tokens for _, ids, params in requests]
    if chunk_tokens is not None:
        groups = group_by_prefix([ids for _, ids, _ in requests], chunk_tokens)
        return [[requests[i] for i in part] for part in balance_groups(groups, weights, replicas)]
    load = [0] * replicas
    batches: list[list] = [[] for _ in range(replicas)]
    for index in sorted(range(len(requests)), key=lambda i: -weights[i]):
        lightest = load.index(min(load))
        batches[lightest].append(requests[index])
        load[lightest] += weights[index]
    return batches


class DataParallelEngine:
    def __init__(self, config: EngineConfig, tokenizer=None):
        self.config = config
        self.tokenizer = tokenizer
        self.broken = False
        cluster = current_cluster()
        if cluster is None:
            configs = replica_configs(config)
            context = mp.get_context("spawn")
            self.outbox = context.Queue()
            self.replicas = [ProcessReplica(index, replica_config, tokenizer, self.outbox, len(configs))
                             for index, replica_config in enumerate(configs)]
        else:
            self.outbox = queue.Queue()
            device = cluster.device()
            first = dataclasses.replace(config, data_parallel=1, device=str(device))
            self.replicas = [ThreadReplica(0, first, tokenizer, self.outbox, device)]
            self.replicas += [RemoteReplica(index, cluster, self.outbox) for index in range(1, cluster.replicas)]
        try:
            ready = {}
            while len(ready) < len(self.replicas):  # loading takes as long as it takes: only deaths end the wait
                index, kind, *rest = self._next(None, "loading")
                if kind != "ready":
                    raise StageFailure(f"{self.replicas[index].name} failed to start: {rest[0]}")
                ready[index] = rest
        except BaseException:
            self.broken = True  # close at once: a replica that failed takes no more messages
            self.close()
            raise
        self.max_model_len = min(limit for limit, _ in ready.values())
        self.vocab_size = next(iter(ready.values()))[1]
        self._pending: list[tuple[int, list[int], object]] = []
        self._ids = 0
        self.num_steps = 0
        self.last_run_stats: dict = {}

    @property
    def processes(self) -> list:
        return [replica.process for replica in self.replicas if isinstance(replica, ProcessReplica)]

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
        batches = split_requests(self._pending, len(self.replicas),
                                 self.config.chunk_tokens if self.config.prefix_caching else None)
        self._pending = []
        busy = set()
        for index, batch in enumerate(batches):
            if batch:
                self.replicas[index].send(batch)
                busy.add(index)
        stats = {}
        self.broken = True  # until every replica is idle again: an interruption leaves them mid-work
        while busy:
            index, kind, *rest = self._next(self.config.stage_timeout, "running")
            if kind == "done":
                yield rest[0]
            elif kind == "idle":
                busy.discard(index)
                stats[index] = rest[0]
            elif kind == "error":
                raise StageFailure(f"{self.replicas[index].name} failed: {rest[0]}")
        self.broken = False
        self.num_steps += sum(s.get("steps", 0) for s in stats.values())
        self.last_run_stats = {"replicas": [stats[r] for r in sorted(stats)], "steps": self.num_steps}

    def abort_all(self) -> None:
        self._pending = []
        if self.broken:  # replicas are mid-work: stop them; the results written so far stay
            self.close()

    def close(self) -> None:
        if not self.broken:
            for replica in self.replicas:
                if replica.failure() is None:
                    with contextlib.suppress(StageFailure):  # one that is gone already needs no stop
                        replica.send(None)
        deadline = time.monotonic() + (0 if self.broken else 10)
        for replica in self.replicas:
            replica.join(max(0.0, deadline - time.monotonic()))
        self.replicas, self.broken = [], True

    def _next(self, silence_limit: float | None, doing: str):
        """The next message of any replica, watching that every replica lives."""
        deadline = None if silence_limit is None else time.monotonic() + silence_limit
        while True:
            try:
                return self.outbox.get(timeout=0.05)
            except queue.Empty:
                pass
            for replica in self.replicas:
                reason = replica.failure()
                if reason is not None:
                    try:  # its last words, if it sent any, say more than its end
                        return self.outbox.get(timeout=0.5)
                    except queue.Empty:
                        pass
                    self.broken = True
                    raise StageFailure(f"{replica.name} {reason} while {doing}")
            if deadline is not None and time.monotonic() > deadline:
                self.broken = True
                raise StageFailure(f"no result from any replica for {silence_limit:g} s while {doing} "
                                   "(--stage-timeout): a replica hangs")


def serve_batches(index: int, make_engine, next_batch, send) -> None:
    """A replica's life: build the engine, say so, then serve batches until None arrives."""
    try:
        engine = make_engine()
    except Exception as error:
        send((index, "failed", f"{type(error).__name__}: {error}"))
        return
    send((index, "ready", engine.max_model_len, engine.model_config.vocab_size))
    try:
        while (batch := next_batch()) is not None:
            parent_id = {}
            for seq_id, token_ids, params in batch:
                parent_id[engine.add_request(token_ids, params)] = seq_id
            for result in engine.run():
                result.seq_id = parent_id[result.seq_id]
                send((index, "done", result))
            send((index, "idle", engine.last_run_stats))
    except Exception as error:
        send((index, "error", f"{type(error).__name__}: {error}"))
    finally:
        engine.close()
    with contextlib.suppress(RuntimeError):  # whoever handed out the batches may have left
        send((index, "closed"))


def replica_main(index: int, config: EngineConfig, tokenizer, inbox, outbox, parent_pid: int, replicas: int) -> None:
    """One spawned replica: an engine (with its own stage processes when pipelined) serving batches."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    if config.resolved_device().type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // replicas))
    serve_batches(index, lambda: LLMEngine(config, tokenizer=tokenizer), inbox.get, outbox.put)


def serve_worker(cluster: Cluster, config: EngineConfig, tokenizer=None) -> None:
    """A torchrun rank other than 0: a replica's head serves rank 0's batches; any other rank is a
    stage, built from the spec its head sends. Returns when rank 0 (or the head) says stop."""
    from pipemax.parallel.distributed import serve_stage_rank

    try:
        if not cluster.is_head:
            serve_stage_rank(cluster)
            return
        config = dataclasses.replace(config, data_parallel=1, device=str(cluster.device()))
        mailbox = cluster.mailbox
        serve_batches(cluster.rank // cluster.stages, lambda: LLMEngine(config, tokenizer=tokenizer),
                      lambda: mailbox.receive(0), lambda message: mailbox.send(message, 0))
    finally:
        leave_cluster()
