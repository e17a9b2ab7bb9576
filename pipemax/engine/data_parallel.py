"""Data parallelism: R replicas of the whole engine (each a pipeline of P stages), one process each.

8 GPUs = PP 4 x DP 2: replica r runs on cuda:r*P .. cuda:r*P+P-1 (every replica on the CPU where
there is no GPU). This process only hands out requests and collects results: each request goes
to the replica with the least work outstanding (prompt + max tokens), results come back as the
replicas finish them, and the caller (the batch job) writes them into one output file, so resume
works as with one replica. `DataParallelEngine` answers the calls LLM makes of an engine.

Replicas die with this process (PR_SET_PDEATHSIG). A replica that dies ends the run with an
error naming it; an interrupted run leaves the replicas mid-work, so the engine is then closed
and a new LLM is needed (the batch job simply exits, and its rerun resumes). Batches and results
travel over pipes, not multiprocessing queues: a queue's semaphores outlive a process killed with
SIGKILL, and the resource tracker then warns of leaked semaphores.

With a trace (--trace), each replica writes its run's events to a file of its own and sends them
with its run's figures; this process writes them into the one trace, replica r as process r.

Under torchrun (cluster.py) the replicas are groups of ranks: replica 0 runs on a thread of rank
0 (this process heads it), replica r is served by its head rank r x P over the world's gloo
group. The hand-out, the results and the failure rules are the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.multiprocessing as mp

from pipemax.core.prefix_order import balance_groups, group_by_prefix
from pipemax.parallel.cluster import Cluster, current_cluster, leave_cluster
from pipemax.parallel.distributed import StageFailure
from pipemax.parallel.processes import die_with_parent, exit_if_importing_main, let_the_head_decide, process_ended

from .config import ConfigError, EngineConfig
from .llm_engine import LLMEngine, check_prompt_ids

log = logging.getLogger(__name__)


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
    """A replica in a process of its own, spawned on this node: a pipe each way, and a thread that
    moves its messages into the outbox that every replica shares."""

    def __init__(self, index: int, config: EngineConfig, tokenizer, outbox: queue.Queue, replicas: int):
        self.name = f"replica {index} on {config.device}"
        context = mp.get_context("spawn")
        inbox_reader, self.inbox = context.Pipe(duplex=False)
        self.messages, outbox_writer = context.Pipe(duplex=False)
        # Not daemonic: a replica with stage processes has children of its own.
        self.process = context.Process(target=replica_main, name=f"pipemax-replica-{index}",
                                       args=(index, config, tokenizer, inbox_reader, outbox_writer, os.getpid(),
                                             replicas))
        self.process.start()
        inbox_reader.close()  # the replica holds the only copies of its ends: its death ends the pipes
        outbox_writer.close()
        self.receiver = threading.Thread(target=self._receive_forever, args=(outbox,), daemon=True,
                                         name=f"pipemax-replica-{index}")
        self.receiver.start()

    def _receive_forever(self, outbox: queue.Queue) -> None:
        while True:
            try:
                outbox.put(self.messages.recv())
            except (EOFError, OSError):  # the replica has ended: failure says how
                return

    def send(self, batch) -> None:
        """Returns once the replica has taken the batch (it waits for one whenever it is idle)."""
        try:
            self.inbox.send(batch)
        except OSError as error:  # the replica is gone
            raise StageFailure(f"{self.name} is gone ({error})") from None

    def failure(self, doing: str) -> str | None:
        return None if self.process.is_alive() else process_ended(self.name, self.process.exitcode, doing)

    def join(self, timeout: float) -> None:
        self.process.join(timeout=timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)
        self.inbox.close()
        self.receiver.join(timeout=5)  # the pipe has ended: so does the thread
        self.messages.close()


class ThreadReplica:
    """Under torchrun, replica 0: rank 0 heads it, on a thread beside the job."""

    def __init__(self, index: int, config: EngineConfig, tokenizer, outbox, device: torch.device):
        self.name = f"replica {index} on rank 0"
        self.inbox: queue.Queue = queue.Queue()

        def main() -> None:
            if device.type == "cuda":
                torch.cuda.set_device(device)  # the current device is per thread
            serve_batches(index, config, tokenizer, self.inbox.get, outbox.put)

        self.thread = threading.Thread(target=main, name=f"pipemax-replica-{index}", daemon=True)
        self.thread.start()

    def send(self, batch) -> None:
        self.inbox.put(batch)

    def failure(self, doing: str) -> str | None:
        return None if self.thread.is_alive() else f"{self.name} stopped while {doing}"

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

    def failure(self, doing: str) -> str | None:
        # A lost rank shows first as an "error" message; this is for the watch after it.
        return None if self.stopped or self.ended is None else f"{self.name} {self.ended} while {doing}"

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
        self.outbox: queue.Queue = queue.Queue()  # (replica, kind, ...) from every replica
        if cluster is None:
            configs = replica_configs(config)
            exit_if_importing_main()
            self.replicas = []
            try:
                for index, replica_config in enumerate(configs):
                    self.replicas.append(ProcessReplica(index, replica_config, tokenizer, self.outbox, len(configs)))
            except BaseException:
                self.broken = True
                self.close()
                raise
        else:
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
        stats, traces = {}, {}
        self.broken = True  # until every replica is idle again: an interruption leaves them mid-work
        while busy:
            index, kind, *rest = self._next(self.config.stage_timeout, "running")
            if kind == "done":
                yield rest[0]
            elif kind == "idle":
                busy.discard(index)
                stats[index], traces[index] = rest
            elif kind == "error":
                raise StageFailure(f"{self.replicas[index].name} failed: {rest[0]}")
        self.broken = False
        self.num_steps += sum(s.get("steps", 0) for s in stats.values())
        self.last_run_stats = {"replicas": [stats[r] for r in sorted(stats)], "steps": self.num_steps}
        if self.config.trace:
            try:
                write_replicas_trace(self.config.trace, traces)
            except OSError as error:  # the folder went away during the run, say: the results still count
                log.warning("the trace was not written to %s (%s)", self.config.trace, error.strerror or error)

    def abort_all(self) -> None:
        self._pending = []
        if self.broken:  # replicas are mid-work: stop them; the results written so far stay
            self.close()

    def close(self) -> None:
        if not self.broken:
            for replica in self.replicas:
                if replica.failure("closing") is None:
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
                failure = replica.failure(doing)
                if failure is not None:
                    try:  # its last words, if it sent any, say more than its end
                        return self.outbox.get(timeout=0.5)
                    except queue.Empty:
                        pass
                    self.broken = True
                    raise StageFailure(failure)
            if deadline is not None and time.monotonic() > deadline:
                self.broken = True
                raise StageFailure(f"no result from any replica for {silence_limit:g} s while {doing} "
                                   "(--stage-timeout): a replica hangs")


def serve_batches(index: int, config: EngineConfig, tokenizer, next_batch, send) -> None:
    """A replica's life: build the engine, say so, then serve batches until None arrives. After
    each batch, "idle" carries the run's figures and, with a trace, the run's trace events."""
    trace_folder = None
    if config.trace:  # a file of this replica's own: the head of the work writes the one trace
        trace_folder = tempfile.mkdtemp(prefix=f"pipemax-replica-{index}-trace-")
        config = dataclasses.replace(config, trace=os.path.join(trace_folder, "trace.json"))
    try:
        try:
            engine = LLMEngine(config, tokenizer=tokenizer)
        except Exception as error:
            send((index, "failed", f"{type(error).__name__}: {error}"))
            return
        send((index, "ready", engine.max_model_len, engine.model_config.vocab_size))
        try:
            while (batch := next_batch()) is not None:
                parent_id = {}
                for seq_id, token_ids, params in batch:
                    parent_id[engine.add_request(token_ids, params)] = seq_id
                started = time.time()  # the run's timeline starts here: wall time lines replicas up
                for result in engine.run():
                    result.seq_id = parent_id[result.seq_id]
                    send((index, "done", result))
                send((index, "idle", engine.last_run_stats, read_trace(config.trace, started)))
        except Exception as error:
            with contextlib.suppress(RuntimeError, OSError):  # whoever handed out the batches may have left
                send((index, "error", f"{type(error).__name__}: {error}"))
        finally:
            engine.close()
        with contextlib.suppress(RuntimeError, OSError):
            send((index, "closed"))
    finally:
        if trace_folder is not None:
            shutil.rmtree(trace_folder, ignore_errors=True)


def read_trace(path: str | None, started: float) -> dict | None:
    """A replica's trace of its last run (None without one, or if it could not be written), and
    when the run started (seconds since the epoch)."""
    if not path:
        return None
    try:
        with open(path) as trace:
            return {"started": started, "events": json.load(trace)["traceEvents"]}
    except (OSError, ValueError, KeyError):  # the engine has said why it wrote none
        return None


def write_replicas_trace(path: str, traces: dict[int, dict | None]) -> None:
    """One Chrome / Perfetto trace of every replica's run: replica r is process r, named so, and
    its events sit where they ran on a wall clock shared with the others."""
    traces = {index: trace for index, trace in sorted(traces.items()) if trace is not None}
    first = min((trace["started"] for trace in traces.values()), default=0.0)
    events = []
    for index, trace in traces.items():
        offset = (trace["started"] - first) * 1e6  # trace times are microseconds
        events.append({"name": "process_name", "ph": "M", "pid": index, "args": {"name": f"replica {index}"}})
        for event in trace["events"]:
            event = {**event, "pid": index}
            if "ts" in event:
                event["ts"] += offset
            events.append(event)
    # A temporary file renamed over the trace: a failed write leaves the old file whole.
    partial = Path(path).with_name(f".{Path(path).name}.partial")
    try:
        partial.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def replica_main(index: int, config: EngineConfig, tokenizer, inbox, outbox, parent_pid: int, replicas: int) -> None:
    """One spawned replica: an engine (with its own stage processes when pipelined) serving batches
    that come down the pipe `inbox`; its messages go up the pipe `outbox`."""
    die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    if config.resolved_device().type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // replicas))
    serve_batches(index, config, tokenizer, inbox.recv, outbox.send)


def serve_worker(cluster: Cluster, config: EngineConfig, tokenizer=None) -> None:
    """A torchrun rank other than 0: a replica's head serves rank 0's batches; any other rank is a
    stage, built from the spec its head sends. Returns when rank 0 (or the head) says stop."""
    from pipemax.parallel.distributed import serve_stage_rank

    previous_handlers = let_the_head_decide()  # torchrun signals every rank: rank 0 reports and stops the rest
    try:
        if not cluster.is_head:
            serve_stage_rank(cluster)
            return
        config = dataclasses.replace(config, data_parallel=1, device=str(cluster.device()))
        mailbox = cluster.mailbox
        serve_batches(cluster.rank // cluster.stages, config, tokenizer, lambda: mailbox.receive(0),
                      lambda message: mailbox.send(message, 0))
    finally:
        leave_cluster()
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
