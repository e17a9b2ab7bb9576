"""Async scheduling (the host one step ahead): with one micro-batch in one process, step k+1 is
launched before step k's tokens are read; its decode inputs come from step k's sampled ids on the
device, stop checks run a step late and a finished sequence's extra token is dropped. Outputs
are the same as waiting for every step: greedy, seeded, penalties, logprobs, stop ids and strings,
max_tokens, max_model_len, preemption, prefix caching, chunked prefill."""

import pytest
import torch

from pipemax import LLM, SamplingParams
from pipemax.engine.config import ConfigError, EngineConfig
from pipemax.worker import stage as stage_module
from tests.engine.test_engine import MAX_TOKENS, hf_greedy, tiny  # noqa: F401 (fixture)


def mixed_requests(prompts, stop_at: int, penalties: bool = False):
    """Requests that end at different steps and sample in every way the sampler can."""
    requests = [
        (prompts[0], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)),
        (prompts[1], SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=MAX_TOKENS, ignore_eos=True,
                                    logprobs=True, top_logprobs=2)),
        (prompts[2], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, stop_token_ids=[stop_at])),
        (prompts[3], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)),
        (prompts[4], SamplingParams(temperature=0.8, top_k=5, seed=3, max_tokens=1, ignore_eos=True)),
        (prompts[1], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=False, logprobs=True)),
    ]
    if penalties:  # its steps are waited for (the penalties read the tokens so far), the others' not
        requests.append((prompts[2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True,
                                                    repetition_penalty=1.5, min_tokens=2)))
    return [prompt for prompt, _ in requests], [params for _, params in requests]


def outputs(llm, prompts, params):
    results = llm.generate(prompts, params, use_tqdm=False)
    return [(r.token_ids, r.outputs[0].finish_reason, r.outputs[0].logprobs, r.outputs[0].top_logprobs)
            for r in results]


@pytest.mark.parametrize("options", [
    dict(),
    dict(kv_cache_gib=6 * 2 * 3 * 8 * 2 * 16 * 4 / 2**30, chunk_tokens=8),  # 6 chunks of 8 tokens: preemption
    dict(max_num_batched_tokens=16, chunk_tokens=8),  # prompts in pieces beside the decodes
    dict(prefix_caching=False, prefill_mode="separate"),
    dict(penalties=True),
], ids=["p1", "small-pool", "chunked-prefill", "separate", "penalties"])
def test_running_ahead_gives_the_outputs_of_waiting_for_every_step(tiny, options):  # noqa: F811
    folder, hf, base_prompts = tiny
    options = dict(options)
    penalties = options.pop("penalties", False)
    prompts = [[t or 1 for t in p] for p in base_prompts]  # (no token 0: transformers takes it for padding)
    first = LLM(model=str(folder), async_scheduling=False, **options)
    free = hf_greedy(hf, prompts[2], MAX_TOKENS)
    prompts, params = mixed_requests(prompts, stop_at=free[5], penalties=penalties)
    first.engine.eos_token_ids = {free[3]}  # (request 6 stops at it, unless it is not generated)
    waited = outputs(first, prompts, params)
    ahead = LLM(model=str(folder), **options)
    assert ahead.engine.runs_ahead and not first.engine.runs_ahead
    ahead.engine.eos_token_ids = first.engine.eos_token_ids
    ran_ahead = outputs(ahead, prompts, params)
    phases = ahead.engine.last_run_stats["phase_seconds"]  # (the bench's per-phase times)
    assert phases["prefill"] > 0 and phases["decode"] > 0
    launched_ahead = ahead.engine.last_run_stats["steps_launched_ahead"]
    assert first.engine.last_run_stats["steps_launched_ahead"] == 0
    assert launched_ahead >= (2 if penalties else MAX_TOKENS - 3)  # (the penalties' 4 steps waited for)
    # Ids and finish reasons exactly. Logprobs to float32 rounding: a row finished by the step
    # before still fills one row of the step after (its token is dropped), and on the CPU a
    # matmul's last bits depend on the batch's rows; so do a prefix's recomputed after a preemption.
    assert [(ids, reason) for ids, reason, *_ in ran_ahead] == [(ids, reason) for ids, reason, *_ in waited]
    for (*_, logprobs, top), (*_, expected, expected_top) in zip(ran_ahead, waited):
        if expected is not None:
            assert logprobs == pytest.approx(expected, abs=1e-4)
        if expected_top is not None:
            assert [[t for t, _ in row] for row in top] == [[t for t, _ in row] for row in expected_top]
    assert waited[0][0] == hf_greedy(hf, prompts[0], MAX_TOKENS)
    assert waited[2][1] == "stop" and waited[2][0] == free[:free.index(free[5]) + 1]
    assert [len(ids) for ids, *_ in waited[3:5]] == [3, 1]
    if "kv_cache_gib" in options:
        assert ahead.engine.scheduler.num_preemptions > 0
    # Both engines are left clean: nothing in flight, no sequence, every chunk free or cached.
    assert not ahead.engine.has_unfinished() and not ahead.engine._in_flight


def test_running_ahead_stops_at_max_model_len(tiny):  # noqa: F811
    folder, _, prompts = tiny
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    for async_scheduling in (False, True):
        llm = LLM(model=str(folder), max_model_len=34, async_scheduling=async_scheduling)
        out = llm.generate([prompts[3], prompts[0]], params, use_tqdm=False)
        assert [len(p) + len(o.token_ids) for p, o in zip([prompts[3], prompts[0]], out)] == [34, 34]


def record_order(monkeypatch, llm):
    """The order of step launches and token reads, as ("launch", n) and ("read", n)."""
    events = []
    pipeline = llm.engine.pipeline
    submit = pipeline.submit

    def recording_submit(plan):
        pending = submit(plan)
        pending.step = sum(kind == "launch" for kind, _ in events)
        events.append(("launch", pending.step))
        return pending

    result = stage_module.PendingTokens.result

    def recording_result(self):
        if self._result is None:
            events.append(("read", self.step))
        return result(self)

    monkeypatch.setattr(pipeline, "submit", recording_submit)
    monkeypatch.setattr(stage_module.PendingTokens, "result", recording_result)
    return events


def test_step_k_plus_1_is_launched_before_step_k_tokens_are_read(tiny, monkeypatch):  # noqa: F811
    folder, _, prompts = tiny
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    llm = LLM(model=str(folder))
    events = record_order(monkeypatch, llm)
    llm.generate(prompts, params, use_tqdm=False)
    reads = [step for kind, step in events if kind == "read"]
    assert reads == sorted(reads) and len(reads) == sum(kind == "launch" for kind, _ in events)
    launched_before_read = [events.index(("launch", step + 1)) < events.index(("read", step))
                            for step in reads[:-1] if ("launch", step + 1) in events]
    assert all(launched_before_read) and len(launched_before_read) == MAX_TOKENS - 1  # (the last step: no next)

    # Without async scheduling, and for steps whose rows need their history (penalties): every
    # step's tokens are read before the next is launched.
    for options, request in ((dict(async_scheduling=False), params),
                             (dict(), SamplingParams(temperature=0, max_tokens=6, presence_penalty=0.5))):
        llm = LLM(model=str(folder), **options)
        events = record_order(monkeypatch, llm)
        llm.generate(prompts[:2], request, use_tqdm=False)
        assert events == [(kind, step) for step in range(len(events) // 2) for kind in ("launch", "read")]


def test_one_stage_without_a_host_pool_uses_the_schedulers_kv_manager(tiny):  # noqa: F811
    """No replay of the KV operations where nothing needs it: the only stage, in this process, with
    no copies to drive, takes the scheduler's manager itself; with a host pool it replays."""
    folder, hf, prompts = tiny
    shared = LLM(model=str(folder), chunk_tokens=8)
    assert shared.engine.stages[0].kv is shared.engine.kv and not shared.engine.stages[0].replays_kv_ops
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    assert [o.token_ids for o in shared.generate(prompts, params, use_tqdm=False)] == \
        [hf_greedy(hf, p, MAX_TOKENS) for p in prompts]
    tiered = LLM(model=str(folder), host_memory_gib=0.01)  # the prefix cache's host tier: copies to drive
    assert tiered.engine.stages[0].kv is not tiered.engine.kv and tiered.engine.stages[0].replays_kv_ops
    two = LLM(model=str(folder), pipeline_parallel=2, pipeline_transport="inprocess")
    assert all(stage.replays_kv_ops for stage in two.engine.stages)


def test_async_scheduling_runs_only_where_one_micro_batch_runs_in_this_process(tiny):  # noqa: F811
    folder, _, _ = tiny
    assert not LLM(model=str(folder), micro_batches=2).engine.runs_ahead  # the other micro-batch hides the host
    assert not LLM(model=str(folder), offload="force", host_memory_gib=0.01).engine.runs_ahead
    with pytest.raises(ConfigError, match="async_scheduling must be True or False"):
        EngineConfig(model="m", async_scheduling="yes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts CUDA host synchronisations")
def test_steady_decode_syncs_the_host_once_per_step_at_most(tiny):  # noqa: F811
    """At M = 1 a decode step's only host wait is for the tokens of the step before (running
    ahead, the device is then already on the next step). CUDA's sync debug mode reports every
    other synchronising call as a warning."""
    import warnings

    folder, _, prompts = tiny
    llm = LLM(model=str(folder))
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    llm.generate(prompts, params, use_tqdm=False)  # warm: graphs captured, kernels compiled
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            llm.generate(prompts, params, use_tqdm=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    steps = llm.engine.last_run_stats["steps"]
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    # (the token read waits on an event, which the debug mode does not count; a run's start and
    # end may synchronise once or twice, never a step)
    assert steps >= 64 and len(syncs) <= 2, f"{len(syncs)} host synchronisations in {steps} steps: {syncs[:3]}"
