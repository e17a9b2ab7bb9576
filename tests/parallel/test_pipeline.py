"""Pipeline stages and micro-batches: greedy ids do not depend on the number of stages, their
layers, the number of micro-batches, chunked prefill or preemption; seeded sampling neither; the
stages' KV managers, driven only by step plans, end up exactly like the scheduler's."""

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from pipemax import LLM, SamplingParams
from pipemax.engine.config import ConfigError
from pipemax.models.config import model_config_from_hf
from pipemax.parallel.partition import PartitionError, partition_layers
from pipemax.parallel.distributed import StageFailure
from pipemax.parallel.processes import MAIN_GUARD_ADVICE
from tests.batch.test_batch_job import ROOT
from tests.engine.test_engine import MAX_TOKENS, hf_greedy
from tests.helpers import assert_all_free_or_cached, settled_kv_managers
from tests.tiny_models import save_tiny_model

PROMPT_LENGTHS = [3, 8, 13, 30, 21, 5, 17]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-pp")
    hf = save_tiny_model("qwen3", folder)  # 3 layers, q/k norm, tied embeddings
    generator = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, hf.config.vocab_size, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]
    return folder, hf, prompts


@pytest.fixture
def tracked_semaphores(monkeypatch):
    """The kinds of resource this process registers with multiprocessing's resource tracker: a
    semaphore there (a multiprocessing queue or lock made for spawned processes) outlives a
    process killed with SIGKILL, and the tracker prints "leaked semaphore objects"."""
    from multiprocessing import resource_tracker

    kinds, register = [], resource_tracker.register

    def record(name, kind):
        kinds.append(kind)
        register(name, kind)

    monkeypatch.setattr(resource_tracker, "register", record)
    return kinds


def run(folder, prompts, params=None, **options):
    options.setdefault("pipeline_transport", "inprocess")
    llm = LLM(model=str(folder), chunk_tokens=8, **options)
    params = params or SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)], llm


def test_stages_and_micro_batches_do_not_change_greedy_ids(tiny):
    folder, hf, prompts = tiny
    reference, _ = run(folder, prompts)
    assert reference == [hf_greedy(hf, prompt, MAX_TOKENS) for prompt in prompts]
    variants = [
        dict(micro_batches=2),  # P = 1: the host plans one micro-batch while the other runs
        dict(pipeline_parallel=2),  # M = P by default
        dict(pipeline_parallel=2, micro_batches=3),
        dict(pipeline_parallel=2, micro_batches=2, stage_layers="1,2"),
        dict(pipeline_parallel=2, micro_batches=4, stage_layers=(2, 1), max_num_batched_tokens=9),  # chunked prefill
        dict(pipeline_parallel=3, micro_batches=3),
        dict(pipeline_parallel=3, micro_batches=5, prefill_mode="separate", max_num_seqs=2),
    ]
    for options in variants:
        ids, llm = run(folder, prompts, **options)
        assert ids == reference, options
        stages = llm.engine.stages
        assert len(stages) == options.get("pipeline_parallel", 1)
        assert_all_free_or_cached(settled_kv_managers(llm))


def test_preemption_across_stages_and_micro_batches(tiny):
    folder, _, prompts = tiny
    reference, _ = run(folder, prompts)
    # Room for the longest sequence, not for all at once: sequences are preempted and recomputed.
    ids, llm = run(folder, prompts, pipeline_parallel=2, micro_batches=3, kv_cache_gib=14 * 8 * 3 * 2 * 2 * 32 * 4 / 2**30)
    assert llm.engine.scheduler.num_preemptions > 0
    assert ids == reference


def test_seeded_sampling_is_the_same_whatever_the_pipeline(tiny):
    folder, _, prompts = tiny
    params = [SamplingParams(temperature=0.9, top_p=0.9, max_tokens=MAX_TOKENS, ignore_eos=True, seed=100 + i,
                             repetition_penalty=1.2, logprobs=True, top_logprobs=2) for i in range(len(prompts))]
    reference, _ = run(folder, prompts, params)
    for options in (dict(pipeline_parallel=2), dict(pipeline_parallel=3, micro_batches=4), dict(micro_batches=3)):
        ids, _ = run(folder, prompts, params, **options)
        assert ids == reference, options


def test_stage_kv_managers_follow_the_scheduler_through_plans_alone(tiny):
    folder, _, prompts = tiny
    llm = LLM(model=str(folder), chunk_tokens=8, pipeline_parallel=3, micro_batches=3, pipeline_transport="inprocess")
    engine = llm.engine
    plans = []
    submit = engine.pipeline.submit

    def record(plan):
        plans.append(pickle.loads(pickle.dumps(plan)))  # a plan is plain data: it can travel between processes
        pending = submit(plan)
        for stage in engine.stages:  # after each step, every stage's chunk tables equal the scheduler's
            for seq_id in plan.seq_ids:
                assert stage.kv.chunk_table(seq_id) == engine.kv.chunk_table(seq_id)
        return pending

    engine.pipeline.submit = record
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len({plan.micro_batch for plan in plans}) == 3
    assert all(plan.num_tokens == sum(plan.counts) for plan in plans)


def test_an_aborted_pipelined_run_frees_every_stage(tiny):
    folder, _, prompts = tiny
    llm = LLM(model=str(folder), chunk_tokens=8, pipeline_parallel=2, micro_batches=3, pipeline_transport="inprocess")

    def explode(index, result, text):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        llm.stream([(p, SamplingParams(max_tokens=5, ignore_eos=True)) for p in prompts], explode)
    engine = llm.engine
    assert not engine.has_unfinished()
    for stage in engine.stages:
        assert stage.kv.gpu.num_free == stage.kv.gpu.num_chunks and not stage.samplers
    ids, _ = run(folder, prompts[:2])
    assert [o.token_ids for o in llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                                          ignore_eos=True), use_tqdm=False)] == ids


def llama_config(layers, vocab=128256, hidden=4096):
    import transformers

    return model_config_from_hf(transformers.LlamaConfig(hidden_size=hidden, intermediate_size=14336,
                                                         num_hidden_layers=layers, num_attention_heads=32,
                                                         num_key_value_heads=8, vocab_size=vocab))


def test_partition_balances_layers_and_counts_the_head():
    config = llama_config(32)
    assert partition_layers(config, 1) == [(0, 32)]
    two = partition_layers(config, 2)
    assert two == [(0, 17), (17, 32)]  # the last stage carries the LM head (~2.4 layers of weights)
    for stages in (3, 4, 8):
        ranges = partition_layers(config, stages)
        assert ranges[0][0] == 0 and ranges[-1][1] == 32 and len(ranges) == stages
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:]))
    small_vocab = llama_config(32, vocab=1000)
    assert partition_layers(small_vocab, 4) == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert partition_layers(config, 3, [10, 11, 11]) == [(0, 10), (10, 21), (21, 32)]


@pytest.mark.parametrize("stages, layers, words", [
    (5, None, "5 pipeline stages for a model of 4 layers"),
    (0, None, "at least 1"),
    (2, [1, 2], "sum to 3, but the model has 4 layers"),
    (2, [4, 0], "at least one layer"),
    (2, [1, 1, 2], "name 3 stages for a pipeline of 2"),
])
def test_impossible_partitions_are_clear_errors(stages, layers, words):
    with pytest.raises(PartitionError, match=words):
        partition_layers(llama_config(4), stages, layers)


def test_pipeline_options_are_checked_before_any_weights_load(tiny, monkeypatch):
    from pipemax.engine import llm_engine as engine_module

    def load_model(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(engine_module, "load_model", load_model)
    folder, _, _ = tiny
    with pytest.raises(ConfigError, match="pipeline_parallel does not fit this model: 4 pipeline stages for a model "
                                          "of 3 layers"):
        LLM(model=str(folder), pipeline_parallel=4)
    with pytest.raises(ConfigError, match="stage_layers does not fit this model: .* sum to 4, but the model has 3"):
        LLM(model=str(folder), pipeline_parallel=2, stage_layers="2,2")
    with pytest.raises(ConfigError, match="micro_batches must be an integer from the number of stages"):
        LLM(model=str(folder), pipeline_parallel=3, micro_batches=2)
    with pytest.raises(ConfigError, match="stage_layers names 2 stages but the pipeline has 3"):
        LLM(model=str(folder), pipeline_parallel=3, stage_layers="1,2")


def test_last_run_stats_report_each_stage(tiny):
    folder, _, prompts = tiny
    _, llm = run(folder, prompts, pipeline_parallel=3, micro_batches=4)
    stats = llm.last_run_stats
    assert stats["stages"] == 3 and stats["micro_batches"] == 4 and stats["stage_layers"] == [1, 1, 1]
    assert stats["steps"] > 0 and 1 <= stats["mean_micro_batch_seqs"] <= len(prompts)
    assert len(stats["stage_busy_seconds"]) == 3 and all(b > 0 for b in stats["stage_busy_seconds"])
    assert sum(stats["stage_busy_seconds"]) <= stats["device_seconds"] * 1.001
    assert all(0 <= f <= 1 for f in stats["stage_bubble_fraction"] + [stats["device_waited_for_host_fraction"]])


@pytest.mark.subprocess
def test_stage_processes_give_the_same_ids_and_samples(tiny, tracked_semaphores):
    """The distributed transport: stages 1 and 2 are processes of their own (gloo on the CPU)."""
    folder, _, prompts = tiny
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    seeded = [SamplingParams(temperature=0.8, max_tokens=MAX_TOKENS, ignore_eos=True, seed=7 + i, top_k=20,
                             presence_penalty=0.5, logprobs=True) for i in range(len(prompts))]
    reference, _ = run(folder, prompts, greedy)
    reference_seeded, _ = run(folder, prompts, seeded)
    tight = 14 * 8 * 3 * 2 * 2 * 32 * 4 / 2**30  # room for the longest sequence only: preemptions
    with LLM(model=str(folder), chunk_tokens=8, pipeline_parallel=3, micro_batches=4, pipeline_transport="distributed",
             max_num_batched_tokens=9, kv_cache_gib=tight / 3) as llm:  # per device: each holds 1 of 3 layers
        assert llm.engine.distributed and len(llm.engine.pipeline.processes) == 2
        assert [o.token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)] == reference
        assert llm.engine.scheduler.num_preemptions > 0
        busy = llm.last_run_stats["stage_busy_seconds"]  # every stage process reports its own device time
        assert len(busy) == 3 and all(b > 0 for b in busy)
        assert [o.token_ids for o in llm.generate(prompts, seeded, use_tqdm=False)] == reference_seeded

        def explode(index, result, text):  # interrupted with steps of several micro-batches in flight
            raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            llm.stream([(p, greedy) for p in prompts], explode)
        assert [o.token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)] == reference
        processes = llm.engine.pipeline.processes
    assert all(not process.is_alive() for process in processes)  # closed: no stage process is left
    with pytest.raises(RuntimeError, match="^this LLM is closed"):  # not a missing process group
        llm.generate(prompts, greedy, use_tqdm=False)
    assert "semaphore" not in tracked_semaphores


@pytest.mark.parametrize("options", [dict(micro_batches=2), dict(pipeline_parallel=2, micro_batches=2),
                                     dict(micro_batches=3, prefill_mode="mixed")])
def test_groups_short_of_kv_do_not_evict_each_other_forever(tiny, options):
    """A tight pool and two long prompts in different groups: preemption follows one order across
    groups (the newest first), so the oldest always progresses, as with one group."""
    folder, hf, _ = tiny
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 211, (n,), generator=generator).tolist() for n in (22, 46)]
    six_chunks = 6 * 8 * 3 * 2 * 2 * 32 * 4 / 2**30
    common = dict(kv_cache_gib=six_chunks, max_num_batched_tokens=16, max_num_seqs=2, max_model_len=48)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    reference, _ = run(folder, prompts, params, **common)
    ids, llm = run(folder, prompts, params, **common, **options)
    assert ids == reference
    assert llm.last_run_stats["steps"] < 200


def test_a_step_that_fails_midway_leaves_every_stage_clean(tiny, monkeypatch):
    folder, _, prompts = tiny
    llm = LLM(model=str(folder), chunk_tokens=8, pipeline_parallel=2, pipeline_transport="inprocess")
    stage0 = llm.engine.stages[0]
    forward, calls = stage0.runner.forward, []

    def interrupted(*args, **kwargs):  # Ctrl-C in stage 0 of the third step: stage 1 never sees it
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    monkeypatch.setattr(stage0.runner, "forward", interrupted)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, params, use_tqdm=False)
    for stage in llm.engine.stages:
        assert stage.kv.gpu.num_free == stage.kv.gpu.num_chunks and not stage.kv.sequences and not stage.samplers
    reference, _ = run(folder, prompts)
    assert [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == reference


@pytest.mark.subprocess
def test_data_parallel_replicas_give_the_same_ids(tiny, tmp_path, tracked_semaphores):
    folder, _, prompts = tiny
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    seeded = SamplingParams(temperature=0.9, max_tokens=MAX_TOKENS, ignore_eos=True, seed=5)
    reference, _ = run(folder, prompts, greedy)
    reference_seeded, _ = run(folder, prompts, seeded)
    trace = tmp_path / "trace.json"
    with LLM(model=str(folder), chunk_tokens=8, data_parallel=2, pipeline_parallel=2, trace=str(trace)) as llm:
        assert len(llm.engine.processes) == 2
        assert [o.token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)] == reference
        stats = llm.last_run_stats
        assert len(stats["replicas"]) == 2 and all(r["steps"] > 0 for r in stats["replicas"])  # both worked
        # The trace holds every replica's run, replica r as process r.
        events = json.loads(trace.read_text())["traceEvents"]
        assert {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"} == {0: "replica 0",
                                                                                                1: "replica 1"}
        for replica in (0, 1):
            tracks = {e["args"]["name"] for e in events if e["pid"] == replica and e["name"] == "thread_name"}
            assert "stage 0 compute" in tracks and any(e["pid"] == replica and e["ph"] == "X" for e in events)
        assert [o.token_ids for o in llm.generate(prompts, seeded, use_tqdm=False)] == reference_seeded
        processes = llm.engine.processes
    assert not any(process.is_alive() for process in processes)
    with pytest.raises(RuntimeError, match="^this LLM is closed"):
        llm.generate(prompts, greedy, use_tqdm=False)
    assert "semaphore" not in tracked_semaphores


def test_replica_traces_are_merged_on_one_wall_clock(tmp_path):
    from pipemax.engine.data_parallel import write_replicas_trace

    def events(name):
        return [{"name": "thread_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": "stage 0 compute"}},
                {"name": name, "ph": "X", "pid": 0, "tid": 0, "ts": 10.0, "dur": 5.0}]

    path = tmp_path / "trace.json"
    # Replica 1 started its run 2 ms after replica 0; replica 2 wrote no trace.
    write_replicas_trace(str(path), {0: {"started": 100.0, "events": events("a")},
                                     1: {"started": 100.002, "events": events("b")}, 2: None})
    merged = json.loads(path.read_text())["traceEvents"]
    assert [(e["name"], e["pid"], round(e["ts"], 3)) for e in merged if e["ph"] == "X"] == [("a", 0, 10.0),
                                                                                          ("b", 1, 2010.0)]
    assert [e["args"]["name"] for e in merged if e["name"] == "process_name"] == ["replica 0", "replica 1"]


@pytest.mark.subprocess
def test_a_stopped_stage_process_is_named(tiny):
    folder, _, prompts = tiny
    llm = LLM(model=str(folder), chunk_tokens=8, pipeline_parallel=2, pipeline_transport="distributed")
    pipeline = llm.engine.pipeline
    stage = pipeline.processes[0]
    start, end = llm.engine.stage_ranges[1]
    pipeline.stage_timeout = 2  # the watchdog's patience, short for the test (the stages started with the default)
    os.kill(stage.pid, signal.SIGSTOP)  # alive, but it runs nothing
    try:
        with pytest.raises(StageFailure) as failure:
            llm.generate(prompts, SamplingParams(max_tokens=2), use_tqdm=False)
    finally:
        llm.close()  # a stopped process can still be killed
    assert str(failure.value) == ("no answer from the pipeline for 2 s while waiting for sampled tokens "
                                  f"(--stage-timeout): stage 1 (pid {stage.pid}, layers [{start}, {end})) is stopped "
                                  "(SIGSTOP or a debugger)")
    assert not stage.is_alive()


def run_script(path, text):
    path.write_text(text)
    return subprocess.Popen([sys.executable, str(path)], env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stderr_of(script, timeout: float) -> str:
    """The script's stderr once it and every process holding its stderr have ended; killed if it
    outlasts `timeout` (its stage processes follow it)."""
    try:
        return script.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        script.kill()
        script.communicate()
        raise


@pytest.mark.subprocess
@pytest.mark.parametrize("options", ["pipeline_parallel=2", "data_parallel=2"])
def test_a_script_without_a_main_guard_fails_at_once_saying_so(tiny, tmp_path, options):
    """Each stage or replica process imports the script again (spawn), and there creates an LLM:
    the process leaves quietly, and the head says what to change as soon as it is gone. With
    stage_timeout=600, a head that waited for the rendezvous would outlast the test."""
    folder, _, _ = tiny
    started = time.monotonic()
    script = run_script(tmp_path / "no_guard.py", textwrap.dedent(f"""\
        from pipemax import LLM

        LLM(model={str(folder)!r}, {options}, stage_timeout=600)
        """))
    stderr = stderr_of(script, timeout=120)
    assert script.returncode == 1 and time.monotonic() - started < 60
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("pipemax.parallel.distributed.StageFailure: ") and lines[-1].endswith(
        f"on cpu could not start: {MAIN_GUARD_ADVICE}"), stderr
    assert "bootstrapping phase" not in stderr and len(lines) < 40, stderr  # no traceback from the child


@pytest.mark.subprocess
def test_killing_a_pipelined_script_leaves_no_noise(tiny, tmp_path):
    """SIGKILL ends the head with nothing to say; its stage process follows it, and neither the
    stage nor multiprocessing's resource tracker prints anything (no "leaked semaphore objects")."""
    folder, _, _ = tiny
    script = run_script(tmp_path / "pipelined.py", textwrap.dedent(f"""\
        import time

        from pipemax import LLM

        if __name__ == "__main__":
            llm = LLM(model={str(folder)!r}, pipeline_parallel=2)
            print("ready", flush=True)
            time.sleep(600)
        """))
    try:
        assert script.stdout.readline() == "ready\n"
    finally:
        script.kill()
    stderr = stderr_of(script, timeout=60)  # the tracker and the stage hold stderr until they end
    assert not any(noise in stderr for noise in ("leaked semaphore", "Exception ignored", "Traceback")), stderr


def test_a_signal_to_a_stage_leaves_the_decision_to_the_head(monkeypatch):
    """SIGTERM reaches every process of a job: a stage goes on serving so that the head can report
    the interruption and stop it; if no stop comes within the grace, it leaves quietly."""
    from pipemax.parallel.processes import let_the_head_decide

    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    previous = let_the_head_decide([signal.SIGTERM], grace=0.3)
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # no exception, no death: serving goes on
        time.sleep(0.05)
        assert exits == []
        deadline = time.monotonic() + 10
        while not exits and time.monotonic() < deadline:
            time.sleep(0.02)
        assert exits == [128 + signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous[signal.SIGTERM])


def test_the_last_stage_takes_the_next_plan_while_its_tokens_are_on_their_way():
    """TokenSender: handing a step's tokens over never waits for them; they reach the head in
    step order once each is ready, and close() sends everything before it returns."""
    import threading

    from pipemax.parallel.distributed import TokenSender

    class Sent:
        def __init__(self):
            self.messages = []

        def send(self, message, dst, tensor=None):
            self.messages.append((message, dst))

    class Pending:
        def __init__(self, value):
            self.value, self.ready = value, threading.Event()

        def result(self):
            assert self.ready.wait(10)
            return self.value

    mailbox = Sent()
    sender = TokenSender(mailbox, 0, torch.device("cpu"), report=lambda words: None)
    steps = [Pending(index) for index in range(3)]
    for index, step in enumerate(steps):
        sender.put(step, {"step": index})  # returns at once: no step's ids have reached the host
    assert mailbox.messages == []
    steps[1].ready.set()
    steps[2].ready.set()
    assert mailbox.messages == []  # step 0 first, whatever is ready after it
    steps[0].ready.set()
    sender.close()
    assert mailbox.messages == [(("tokens", index, {"step": index}), 0) for index in range(3)]


def test_data_parallel_replicas_share_the_node_host_pool(monkeypatch):
    from pipemax.engine import config as config_module
    from pipemax.engine.config import EngineConfig
    from pipemax.engine.data_parallel import replica_configs

    # The default pool is a quarter of what is free: read once, not as other jobs move it between calls.
    monkeypatch.setattr(config_module, "available_host_memory_gib", lambda: 16.0)

    config = EngineConfig(model="m", device="cpu", data_parallel=4, offload="force", host_memory_gib=2.0)
    assert [c.host_kv_bytes() for c in replica_configs(config)] == [2**29] * 4  # a quarter each, not 2 GiB each
    default = EngineConfig(model="m", device="cpu", data_parallel=2, offload="auto")
    assert sum(c.host_kv_bytes() for c in replica_configs(default)) <= default.host_kv_bytes() + 2
    assert all(c.host_kv_bytes() == 0 for c in replica_configs(EngineConfig(model="m", device="cpu", data_parallel=2)))
