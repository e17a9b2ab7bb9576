"""Stages as processes: the distributed transport, one process per stage.

Rank 0 is the engine's process: it runs the scheduler and stage 0. On one node it spawns ranks
1..P-1, each loading only its own layers on its own device (cuda:r, or the CPU). Under torchrun
(cluster.py) the ranks already exist, on any node: the head sends each its StageSpec, and a
replica's ranks are head..head+P-1 of a larger world. Step plans and sampled
tokens travel as pickled messages over a gloo group; activations go point to point on the
default group (NCCL between GPUs, gloo on the CPU). Every send is asynchronous, so no stage waits
for its successor to take a message, and rank 0 only waits where the engine reads a result.

    rank 0: stage 0, then plan + hidden -> rank 1 -> ... -> rank P-1: samples -> tokens -> rank 0

Failure: rank 0 polls its receives and the stage processes; a stage that dies (its exit code or
signal named) or sends nothing for `stage_timeout` seconds (the message names the stopped or
silent stages) ends the run with StageFailure, and every stage process is ended. Start-up is
watched too: rank 0 hosts the rendezvous store and waits for each stage to check in, so a stage
that dies while it imports (a script without a `__main__` guard: processes.py) ends the wait at
once. Stage processes die with rank 0 (PR_SET_PDEATHSIG), so none is left behind even when rank
0 is killed; their last words come back over a pipe each. Under torchrun a stage's failure reaches the head as its
last words or as a broken connection, and torchrun ends every rank.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import signal
import socket
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from urllib.parse import urlsplit

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipemax.core.kv_manager import KVManager
from pipemax.core.step_plan import SampledTokens, StagePlan
from pipemax.worker.kv_pool import KVPool, KVPoolSpec
from pipemax.worker.kv_transfers import transfer_stats
from pipemax.worker.stage import StageExecutor

from .processes import die_with_parent, exit_if_importing_main, let_the_head_decide, process_ended, process_is_stopped

# A message group's own timeout: a receive waits this long before gloo gives up. Stages and idle
# LLMs wait for their next message indefinitely; the head's --stage-timeout is the watchdog.
MAILBOX_TIMEOUT = timedelta(days=365)


def init_world(backend: str, **kwargs) -> None:
    """init_process_group, with NCCL's communication on high-priority streams: activations
    between stages are on every stage's critical path, ahead of KV prefetch and write-back
    (kv_transfers.py)."""
    dist.init_process_group(backend, pg_options=process_group_options(backend), **kwargs)


def process_group_options(backend: str):
    nccl = getattr(dist, "ProcessGroupNCCL", None)
    if backend != "nccl" or nccl is None:  # (a build without NCCL: init_process_group says so)
        return None
    return nccl.Options(is_high_priority_stream=True)


class StageFailure(RuntimeError):
    """A stage process died or stopped answering: the job cannot go on."""


def store_address(init_method: str) -> tuple[str, int]:
    """Host and port of a tcp://HOST:PORT rendezvous."""
    parts = urlsplit(init_method)
    return parts.hostname, parts.port


@dataclass
class StageSpec:
    """What a stage process needs to build its stage (picklable)."""
    rank: int
    world_size: int
    init_method: str
    stage_timeout: float
    model_path: str
    layer_range: tuple[int, int]
    device: str
    dtype: torch.dtype
    chunk_tokens: int
    num_chunks: int
    attention_backend: str
    cuda_graphs: bool
    max_num_seqs: int
    max_model_len: int
    eos_token_ids: set[int]
    seed: int
    head_rank: int = 0  # the rank of the pipeline's stage 0 (not 0 for other replicas under torchrun)
    num_host_chunks: int = 0  # the stage's host KV pool (offload)
    max_num_batched_tokens: int = 0  # CUDA graphs for steps with prefill: token buckets up to this
    staging_chunks: int = 0  # one slot of the staging ring (offload), as on every stage
    kv_dtype: torch.dtype | None = None  # what the KV pool holds (None: dtype); fp8 with scales

    @property
    def is_last(self) -> bool:
        return self.rank == self.head_rank + self.world_size - 1


def share_cpu_cores(world_size: int) -> None:
    """Stages on the CPU split the cores: P processes each running as many threads as there are
    cores would spin against each other."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stage_devices(device: torch.device, world_size: int) -> list[str]:
    """One device per stage: cuda:0..P-1 on GPUs, the CPU for every stage elsewhere."""
    if device.type != "cuda":
        return ["cpu"] * world_size
    first = device.index or 0
    count = torch.cuda.device_count()
    if first + world_size > count:
        raise ValueError(f"{world_size} stage processes need {world_size} GPUs from cuda:{first}, but this machine "
                         f"has {count}")
    return [f"cuda:{first + rank}" for rank in range(world_size)]


@contextmanager
def deferred_interrupts():
    """Ctrl-C or SIGTERM inside the block takes effect at its end: a message half sent (its size
    but not its body), or taken from a queue but not yet counted, would leave the pipeline's
    bookkeeping one step off. Outside the main thread, a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in previous:
        signal.signal(signum, lambda number, frame: caught.append((number, frame)))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for number, frame in caught[:1]:
            handler = previous[number]
            if callable(handler):
                handler(number, frame)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(number)


# ---- messages -----------------------------------------------------------------------------------
class Mailbox:
    """Asynchronous pickled messages on a gloo group; sends are kept alive until done.

    A gloo send never reports itself complete until waited on, so the oldest sends are waited for
    once more than MAX_IN_FLIGHT are outstanding: by then their receiver has long taken them (it
    is at most a few steps behind), and without it every message and activation of a long job
    would stay in memory."""

    MAX_IN_FLIGHT = 16

    def __init__(self, group, patience: float | None = None):
        self.group = group
        self.patience = patience  # seconds a peer may leave a message untaken before sends fail
        self.sending: deque = deque()  # (works, dst, buffers kept alive)
        self.lock = threading.Lock()  # rank 0 sends from the job's thread and replica 0's

    def send(self, obj, dst: int, tensor: torch.Tensor | None = None) -> None:
        """obj pickled on this gloo group; tensor, if any, on the default group (NCCL between GPUs)."""
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        size = torch.tensor([payload.numel()], dtype=torch.int64)
        with self.lock, deferred_interrupts():  # all of a message, or none of it
            works = [dist.isend(size, dst, group=self.group), dist.isend(payload, dst, group=self.group)]
            if tensor is not None:
                works.append(dist.isend(tensor, dst))
            self.sending.append((works, dst, (size, payload, tensor)))
            while len(self.sending) > self.MAX_IN_FLIGHT:
                works, peer, _ = self.sending[0]
                for work in works:
                    if self.patience is None:
                        work.wait()
                    elif not _wait(work, self.patience):
                        raise RuntimeError(f"rank {peer} took no message for {self.patience:g} s")
                self.sending.popleft()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every send is done (at most `timeout` seconds: a peer that has left never
        takes its last message). True if all were."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            while self.sending:
                for work in self.sending[0][0]:
                    if deadline is None:
                        work.wait()
                    else:
                        left = deadline - time.monotonic()
                        if left <= 0 or not _wait(work, left):
                            return False
                self.sending.popleft()
        return True

    def receive(self, src: int):
        """The next message from src (blocking)."""
        size = torch.empty(1, dtype=torch.int64)
        dist.recv(size, src, group=self.group)
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.recv(payload, src, group=self.group)
        return pickle.loads(payload.numpy().tobytes())


# ---- rank 0 -------------------------------------------------------------------------------------
class RemoteTokens:
    """A step's sampled tokens, on their way back from the last stage."""

    def __init__(self, pipeline: DistributedPipeline):
        self.pipeline = pipeline
        self._result: SampledTokens | None = None

    def result(self) -> SampledTokens:
        if self._result is None:
            self._result = self.pipeline.receive_result()
        return self._result


class DistributedPipeline:
    """Rank 0's side. Built in two moves, so the stage processes load their layers while this
    process loads stage 0: the constructor spawns them, `attach` waits until they are ready."""

    def __init__(self, specs: list[StageSpec], backend: str, device: torch.device, cluster=None):
        """Spawns the stages' processes on this node, or with a torchrun `cluster`, sends its stage
        ranks their specs."""
        self.cluster = cluster
        if dist.is_initialized() and cluster is None:
            raise RuntimeError("one distributed pipeline per process: close() the other LLM first")
        self.world_size = len(specs) + 1
        self.head = specs[0].head_rank
        self.last_rank = self.head + self.world_size - 1
        self.stage_timeout = specs[0].stage_timeout
        self.devices = [str(device)] + [spec.device if cluster is None else f"rank {spec.rank}" for spec in specs]
        self.layer_ranges = [None] + [spec.layer_range for spec in specs]  # stage 0's is the engine's
        self.broken = False  # a stage failed: only closing is left
        self.owed = 0  # steps submitted whose tokens have not been read
        self.stage0: StageExecutor | None = None
        self.stages: list[StageExecutor] = []  # this process's stages (for stats)
        context = mp.get_context("spawn")
        self.last_words: dict[int, object] = {}  # rank -> the read end of that spawned stage's pipe
        self.processes = []
        self.threads_before = torch.get_num_threads()
        if cluster is None:
            self._spawn(specs, backend, device, context)
        else:
            self.mailbox = cluster.mailbox
            self.mailbox.patience = self.stage_timeout
            for spec in specs:
                self.mailbox.send(("spec", spec), spec.rank)
        try:
            # One long-lived receiver per stage: a wait interrupted (Ctrl-C) loses no message.
            self.inboxes = {rank: queue.Queue() for rank in range(self.head + 1, self.last_rank + 1)}
            self.receivers = [threading.Thread(target=self._receive_forever, args=(rank, inbox), daemon=True,
                                               name=f"pipemax-receive-{rank}") for rank, inbox in self.inboxes.items()]
            for receiver in self.receivers:
                receiver.start()
        except BaseException:
            self.close()
            raise

    def _spawn(self, specs: list[StageSpec], backend: str, device: torch.device, context) -> None:
        if backend == "gloo":
            share_cpu_cores(self.world_size)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL binds rank 0 to the current device
        exit_if_importing_main()
        timeout = timedelta(seconds=self.stage_timeout)
        try:
            # This process hosts the rendezvous store, so it can wait for the stages to check in
            # while it watches them, rather than inside a join that only a timeout ends.
            host, port = store_address(specs[0].init_method)
            store = dist.TCPStore(host, port, self.world_size, is_master=True, timeout=timeout,
                                  wait_for_workers=False)
            for spec in specs:
                reader, writer = context.Pipe(duplex=False)
                process = context.Process(target=stage_main, args=(spec, os.getpid(), writer), daemon=True,
                                          name=f"pipemax-stage-{spec.rank}")
                process.start()
                writer.close()  # the stage holds the only write end: its death reads as the pipe's end
                self.processes.append(process)
                self.last_words[spec.rank] = reader
            self._wait_for_check_ins(store, [spec.rank for spec in specs])
            init_world(backend, store=store, rank=0, world_size=self.world_size, timeout=timeout)
            self.mailbox = Mailbox(dist.new_group(backend="gloo", timeout=MAILBOX_TIMEOUT))
        except Exception as error:
            try:
                if isinstance(error, StageFailure):
                    raise
                self._raise_for_dead_stage("starting", patience=20)  # a broken join shows before the exit code
                raise StageFailure(f"the stage processes did not join ({error})") from None
            finally:
                self.close()
        except BaseException:  # Ctrl-C while the stages start
            self.close()
            raise

    def _wait_for_check_ins(self, store, ranks: list[int]) -> None:
        """Until every stage process has set its key in the store (it is past its imports and about
        to join), watching the processes: one that dies while it starts ends the wait at once.
        Imports can be slow on a busy machine: the processes are watched, the clock less so."""
        keys = [check_in_key(rank) for rank in ranks]
        limit = max(30 * self.stage_timeout, 1800)
        deadline = time.monotonic() + limit
        while not store.check(keys):
            self._raise_for_dead_stage("starting", patience=0)
            if time.monotonic() > deadline:
                raise StageFailure(f"the stage processes did not start within {limit:g} s")
            time.sleep(0.05)

    def attach(self, stage0: StageExecutor) -> None:
        """Stage 0 is built: wait until every stage process has loaded its layers."""
        self.stage0, self.stages = stage0, [stage0]
        self.devices[0] = str(stage0.device)
        self.start_run()
        try:
            for rank in self.inboxes:
                # Loading a large stage takes minutes: the processes are watched, the clock less so.
                stage = rank - self.head
                status = self._receive(rank, f"loading stage {stage}", timeout=max(30 * self.stage_timeout, 1800))
                if status[0] != "ready":
                    raise StageFailure(f"stage {stage} on {self.devices[stage]} failed to start: {status[1]}")
        except BaseException:
            self.close()
            raise

    def start_run(self, timeline=None) -> None:
        from .pipeline import StageClock

        self.clock = StageClock(self.stage0.device, 1)
        self.clock.timeline = timeline
        self.stage0.transfers.timeline = timeline
        # Each stage process reports its device time so far with every step: the run's share is
        # the difference from where it stood when the run began.
        self.stage_busy_at_start = dict(getattr(self, "stage_busy", {}))
        self.stage_busy: dict[int, dict] = dict(self.stage_busy_at_start)
        self.counters_at_start = self.stage0.transfers.counters()

    def stats(self) -> dict:
        stats = self.clock.stats()
        if not stats:
            return stats
        wall = stats["device_seconds"]  # stage 0's span of the run, which the other stages' steps share
        busy = stats["stage_busy_seconds"] + [self.stage_busy.get(rank, {}).get("busy", 0.0)
                                              - self.stage_busy_at_start.get(rank, {}).get("busy", 0.0)
                                              for rank in self.inboxes]
        stats["transfers"] = transfer_stats(
            [self.stage0.transfers.counters()] + [self.stage_busy.get(rank, {}) for rank in self.inboxes],
            [self.counters_at_start] + [self.stage_busy_at_start.get(rank, {}) for rank in self.inboxes])
        stats["stage_busy_seconds"] = busy
        stats["stage_bubble_fraction"] = [max(0.0, 1 - b / wall) if wall else 0.0 for b in busy]
        stats.pop("device_waited_for_host_fraction", None)  # stage 0's idle time is mostly the others' turn
        return stats

    def submit(self, plan: StagePlan) -> RemoteTokens:
        if self.broken:
            raise StageFailure("the pipeline has failed: start a new LLM")
        self.clock.begin_step()
        hidden, _ = self.stage0.execute(plan, None, self.clock)
        # A decode step's output is a view of a CUDA-graph buffer that the next replay overwrites,
        # maybe while NCCL still reads it: send a copy of its own.
        hidden = hidden.clone() if hidden.is_cuda else hidden.contiguous()
        self._send(("step", plan, {}), hidden, "sending a step")
        self.owed += 1
        return RemoteTokens(self)

    def reset(self) -> None:
        """Every stage back to no sequences (after an aborted run, maybe mid-step): the tokens of
        steps still in flight are read and dropped first, so none is mistaken for a later step's."""
        self.stage0.reset()
        if self.broken:  # being closed: its stages need no more news
            return
        while self.owed:
            self.receive_result()
        self._send(("reset",), None, "resetting the stages")

    def _send(self, message, tensor: torch.Tensor | None, doing: str) -> None:
        try:
            self.mailbox.send(message, self.head + 1, tensor)
        except RuntimeError as error:  # the connection to stage 1 is gone
            self.broken = True
            self._raise_for_dead_stage(doing, patience=20)
            raise StageFailure(f"the pipeline broke while {doing}: {error}") from None

    def receive_result(self) -> SampledTokens:
        """The oldest owed step's tokens (`_receive` counts them off as it takes the message)."""
        message = self._receive(self.last_rank, "waiting for sampled tokens")
        self.stage_busy.update(message[2])
        return message[1]

    def _receive_forever(self, rank: int, inbox: queue.Queue) -> None:
        while True:
            try:
                message = self.mailbox.receive(rank)
            except BaseException as error:  # the peer is gone (or the group was destroyed)
                inbox.put(("broken", error))
                return
            if message[0] == "stopped":  # the stage's last message
                return
            inbox.put(message)

    def _receive(self, src: int, doing: str, timeout: float | None = None):
        """The next message from src, while watching the stage processes and the clock."""
        deadline = time.monotonic() + (timeout or self.stage_timeout)
        while True:
            try:
                with deferred_interrupts():  # a message taken is a message counted
                    message = self.inboxes[src].get(timeout=0.05)
                    if message[0] == "tokens":
                        self.owed -= 1
                break
            except queue.Empty:
                pass
            self._raise_for_dead_stage(doing, patience=0)
            if time.monotonic() > deadline:
                self.broken = True
                raise StageFailure(f"no answer from the pipeline for {timeout or self.stage_timeout:g} s while "
                                   f"{doing} (--stage-timeout): {self._silent_stages()}")
        if message[0] in ("broken", "error"):
            self._raise_for_failed_stage(src, message, doing)
        return message

    def _silent_stages(self) -> str:
        """Which stages the head waits on: the stopped ones when any is (SIGSTOP, a debugger), else
        every stage after stage 0, with what a look at them needs (pid, or rank, and layers)."""
        described = {}
        for stage in range(1, self.world_size):
            start, end = self.layer_ranges[stage]
            where = f"pid {self.processes[stage - 1].pid}" if self.cluster is None else self.devices[stage]
            described[stage] = f"stage {stage} ({where}, layers [{start}, {end}))"
        if self.cluster is None:
            stopped = [described[stage] for stage, process in enumerate(self.processes, start=1)
                       if process_is_stopped(process.pid)]
            if stopped:
                return f"{', '.join(stopped)} {'is' if len(stopped) == 1 else 'are'} stopped (SIGSTOP or a debugger)"
        return f"a stage hangs: one of {', '.join(described.values())}"

    def _raise_for_failed_stage(self, rank: int, message, doing: str) -> None:
        self.broken = True
        self._raise_for_dead_stage(doing, patience=20)  # a broken connection shows before the exit code
        stage = rank - self.head
        if message[0] == "error":  # a torchrun rank's last words
            raise StageFailure(f"stage {stage} on {self.devices[stage]} failed while {doing}: {message[1]}")
        raise StageFailure(f"the pipeline broke while {doing}: stage {stage} on {self.devices[stage]} is gone "
                           f"({message[1]})")

    def _raise_for_dead_stage(self, doing: str, patience: int) -> None:
        if self.cluster is not None:  # no processes of ours: a failure shows as a message
            for rank, inbox in self.inboxes.items():
                if rank != self.last_rank and not inbox.empty():
                    message = inbox.queue[0]
                    if message[0] in ("broken", "error"):
                        inbox.get()
                        self._raise_for_failed_stage(rank, message, doing)
            return
        for attempt in range(patience + 1):
            for rank, process in enumerate(self.processes, start=1):
                if not process.is_alive():
                    self.broken = True
                    said = self._last_words(rank)
                    raise StageFailure(process_ended(f"stage {rank} on {self.devices[rank]}", process.exitcode,
                                                     doing) + said)
            if attempt < patience:
                time.sleep(0.05)

    def _last_words(self, rank: int) -> str:
        words = ""
        reader = self.last_words.get(rank)
        try:
            while reader is not None and reader.poll():
                words = f": {reader.recv()}"
        except (EOFError, OSError):  # nothing (more) was said
            pass
        return words

    def close(self) -> None:
        """End every stage process: politely when the pipeline is well, at once when it is not."""
        if getattr(self, "closed", False):
            return
        self.closed = True
        if dist.is_initialized() and not self.broken and all(p.is_alive() for p in self.processes):
            try:
                self.reset() if self.stage0 is not None else None
                self.mailbox.send(("stop",), self.head + 1)
                self.mailbox.flush()
            except Exception:
                self.broken = True
        if self.cluster is not None:  # the ranks and the process group belong to torchrun's world
            # A receiver still inside a gloo receive when the process exits aborts it: wait for
            # each stage's last message.
            deadline = time.monotonic() + (0 if self.broken else 10)
            for receiver in getattr(self, "receivers", []):
                receiver.join(timeout=max(0.0, deadline - time.monotonic()))
            return
        deadline = time.monotonic() + (0 if self.broken else 5)
        for process in self.processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass
        self.processes = []
        for reader in self.last_words.values():
            reader.close()
        self.last_words = {}
        torch.set_num_threads(self.threads_before)


def _wait(work, seconds: float) -> bool:
    try:
        work.wait(timeout=timedelta(seconds=seconds))
        return True
    except RuntimeError:  # timed out, or the peer is gone
        return False


# ---- ranks 1..P-1 -------------------------------------------------------------------------------
def check_in_key(rank: int) -> str:
    return f"pipemax/started/{rank}"


def stage_main(spec: StageSpec, parent_pid: int, last_words) -> None:
    """A spawned stage process: check in with rank 0's store, join, then serve the stage until
    told to stop. Last words go down the pipe `last_words` (kept short: a pipe holds 64 KiB, and
    the process exits right after)."""
    die_with_parent(parent_pid)
    # Ctrl-C reaches the whole group: rank 0 decides, and may go on (a script that catches it).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    let_the_head_decide([signal.SIGTERM])
    backend = "nccl" if spec.device.startswith("cuda") else "gloo"
    if backend == "gloo":
        share_cpu_cores(spec.world_size)
    else:
        torch.cuda.set_device(torch.device(spec.device))  # before NCCL binds this rank to a device
    timeout = timedelta(seconds=spec.stage_timeout)
    host, port = store_address(spec.init_method)
    store = dist.TCPStore(host, port, spec.world_size, is_master=False, timeout=timeout)
    store.set(check_in_key(spec.rank), "")
    init_world(backend, store=store, rank=spec.rank, world_size=spec.world_size, timeout=timeout)
    mailbox = Mailbox(dist.new_group(backend="gloo", timeout=MAILBOX_TIMEOUT))
    serve_stage(spec, mailbox, lambda words: last_words.send(words[:4000]))
    dist.destroy_process_group()


def serve_stage_rank(cluster) -> None:
    """A stage rank under torchrun: its head sends the spec; it runs on its own local device."""
    message = cluster.mailbox.receive(cluster.head)
    if message[0] != "spec":  # the head gave up before building its pipeline
        return
    spec = replace(message[1], device=str(cluster.device()))

    def report(words: str) -> None:  # last words go to the head, which names this rank
        with contextlib.suppress(RuntimeError):  # the head may be gone too
            cluster.mailbox.send(("error", words), cluster.head)
            cluster.mailbox.flush(timeout=5)

    serve_stage(spec, cluster.mailbox, report)


def serve_stage(spec: StageSpec, mailbox: Mailbox, report) -> None:
    """Build the stage, then apply step plans until told to stop. A failure is reported (the
    head names the stage and the cause) and ends the process at once."""
    rank, last, head = spec.rank, spec.is_last, spec.head_rank
    try:
        stage = build_stage(spec)
    except Exception as error:
        mailbox.send(("failed", f"{type(error).__name__}: {error}"), head)
        mailbox.flush()
        return
    mailbox.send(("ready",), head)
    hidden_size = stage.model.config.hidden_size
    from .pipeline import StageClock

    clock = StageClock(stage.device, spec.world_size)
    # The last stage hands each step's tokens to a sender thread and takes the next plan at once:
    # waiting for the sampled ids here would leave its device idle while it receives, replays and
    # prepares the next step.
    tokens = TokenSender(mailbox, head, stage.device, report) if last else None
    try:
        while True:
            message = mailbox.receive(rank - 1)
            if message[0] == "stop":
                if not last:
                    mailbox.send(message, rank + 1)
                else:
                    tokens.close()  # every step's tokens before "stopped"
                mailbox.send(("stopped",), head)  # the head's receiver for this rank may end
                break
            if message[0] == "reset":
                stage.reset()
                if not last:
                    mailbox.send(message, rank + 1)
                continue
            plan, busy = message[1], message[2]
            hidden = torch.empty(plan.num_tokens, hidden_size, dtype=spec.dtype, device=stage.device)
            dist.recv(hidden, rank - 1)
            out, _ = stage.execute(plan, hidden, clock)
            # This stage's device time and copies so far, for the run's stats.
            busy = {**busy, rank: {"busy": clock.folded_busy(), **stage.transfers.counters()}}
            if last:
                tokens.put(out, busy)
            else:  # a copy of its own: a graph buffer is overwritten by the next replay
                mailbox.send(("step", plan, busy), rank + 1, out.clone() if out.is_cuda else out.contiguous())
    except Exception as error:  # tell the head why: it names the stage and the cause
        report(f"{type(error).__name__}: {error}")
        os._exit(1)
    mailbox.flush()


class TokenSender:
    """The last stage's sampled ids to the head, from a thread of their own, in step order: the
    thread waits for each step's ids to reach the host (PendingTokens.result) while the stage's
    loop goes on to the next plan. The next step of the same sequences is planned only after
    their ids reach the head, so the sampler history they record is in place by then."""

    def __init__(self, mailbox: Mailbox, head: int, device: torch.device, report):
        self.mailbox, self.head, self.device, self.report = mailbox, head, device, report
        self.pending: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="pipemax-token-sender", daemon=True)
        self.thread.start()

    def put(self, out, busy: dict) -> None:
        self.pending.put((out, busy))

    def close(self) -> None:
        self.pending.put(None)
        self.thread.join()

    def _run(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        try:
            while (item := self.pending.get()) is not None:
                out, busy = item
                self.mailbox.send(("tokens", out.result(), busy), self.head)
        except Exception as error:  # as the stage's loop does: the head names the stage and the cause
            self.report(f"{type(error).__name__}: {error}")
            os._exit(1)


def build_stage(spec: StageSpec) -> StageExecutor:
    from pipemax.models import load_model

    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    start, end = spec.layer_range
    model = load_model(spec.model_path, start, end, device=device, dtype=spec.dtype)
    config = model.config
    kv_spec = KVPoolSpec(end - start, config.num_kv_heads, config.head_dim, spec.chunk_tokens, spec.dtype,
                         spec.kv_dtype)
    pool = KVPool(kv_spec, spec.num_chunks, spec.num_host_chunks, device, spec.attention_backend)
    kv = KVManager(spec.num_chunks, spec.num_host_chunks, spec.chunk_tokens, spec.staging_chunks)
    stage = StageExecutor(spec.rank - spec.head_rank, model, pool, kv,
                          spec.attention_backend, spec.eos_token_ids, spec.seed)
    if spec.cuda_graphs and device.type == "cuda" and spec.attention_backend == "triton":
        stage.enable_cuda_graphs(spec.max_num_seqs, spec.max_model_len, spec.max_num_batched_tokens)
    return stage
