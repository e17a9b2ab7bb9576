"""Async scheduling against waiting for every step, on random request mixes and engine settings:
token ids and finish reasons are the same, the async engine runs ahead where nothing forbids it,
and both engines end clean (nothing unfinished, every KV chunk free or cached)."""

from hypothesis import event, given, note, settings
from hypothesis import strategies as st

from pipemax import LLM, SamplingParams
from tests.engine.test_engine import hf_greedy, tiny  # noqa: F401 (fixture)
from tests.helpers import assert_all_free_or_cached, examples, settled_kv_managers

VOCAB = 211  # the tiny llama3's
CHUNK_BYTES = 2 * 3 * 8 * 2 * 16 * 4  # K and V, 3 layers, 8 tokens, 2 KV heads, 16 dims, float32


@st.composite
def request_mix(draw, hf, max_model_len):
    """Requests (prompt, SamplingParams) whose prompts fit max_model_len; some carry penalties."""
    count = draw(st.integers(1, 8))
    penalties_allowed = draw(st.integers(0, 4)) == 0
    requests = []
    for _ in range(count):
        longest = 40 if max_model_len is None else min(40, max_model_len - 1)
        prompt = draw(st.lists(st.integers(1, VOCAB - 1), min_size=1, max_size=longest))
        max_tokens = draw(st.integers(1, 12))
        options = dict(max_tokens=max_tokens, ignore_eos=draw(st.booleans()))
        if draw(st.booleans()):
            options["temperature"] = 0
        else:
            options.update(temperature=draw(st.sampled_from([0.5, 1.0, 1.5])), seed=draw(st.integers(0, 2**31)),
                           top_p=draw(st.sampled_from([1.0, 0.9, 0.5])), top_k=draw(st.sampled_from([0, 3, 20])))
        stop = draw(st.sampled_from(["none", "greedy", "random"]))
        if stop == "greedy":  # a token the greedy continuation (transformers') produces
            reference = hf_greedy(hf, prompt, max_tokens)
            options["stop_token_ids"] = [draw(st.sampled_from(reference))]
        elif stop == "random":
            options["stop_token_ids"] = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=3))
        if penalties_allowed and draw(st.booleans()):
            options.update(presence_penalty=draw(st.sampled_from([0.0, 0.5, -0.5])),
                           repetition_penalty=draw(st.sampled_from([1.0, 1.3, 0.8])),
                           min_tokens=draw(st.integers(0, max_tokens)))
        requests.append((prompt, SamplingParams(**options)))
    return requests


@st.composite
def scenario(draw, hf):
    max_model_len = draw(st.one_of(st.none(), st.integers(24, 64)))
    options = dict(chunk_tokens=8, prefill_mode=draw(st.sampled_from(["mixed", "separate"])),
                   max_num_batched_tokens=draw(st.integers(8, 64)), prefix_caching=draw(st.booleans()))
    if max_model_len is not None:
        options["max_model_len"] = max_model_len
    batches = [draw(request_mix(hf, max_model_len)) for _ in range(draw(st.integers(1, 2)))]
    if draw(st.booleans()):  # a small pool: enough for the longest sequence and a chunk or two more (preemption)
        longest = max(len(p) + params.max_tokens for batch in batches for p, params in batch)
        if max_model_len is not None:
            longest = min(longest, max_model_len)
        chunks = -(-(longest + 1) // 8) + draw(st.integers(0, 2))
        options["kv_cache_gib"] = chunks * CHUNK_BYTES / 2**30
    eos = set(draw(st.lists(st.integers(0, VOCAB - 1), min_size=0, max_size=4)))
    return options, batches, eos


def run(folder, options, batches, eos, async_scheduling):
    llm = LLM(model=str(folder), async_scheduling=async_scheduling, **options)
    llm.engine.eos_token_ids = eos
    results, launched_ahead = [], []
    for batch in batches:
        out = llm.generate([p for p, _ in batch], [params for _, params in batch], use_tqdm=False)
        results.append([(r.token_ids, r.outputs[0].finish_reason) for r in out])
        launched_ahead.append(llm.engine.last_run_stats["steps_launched_ahead"])
    assert not llm.engine.has_unfinished() and not llm.engine._in_flight
    assert_all_free_or_cached(settled_kv_managers(llm))
    return results, launched_ahead, llm


@settings(max_examples=examples(10))
@given(data=st.data())
def test_async_scheduling_equals_waiting_on_random_mixes(tiny, data):  # noqa: F811
    folder, hf, _ = tiny
    options, batches, eos = data.draw(scenario(hf))
    note(f"options={options} eos={eos} batches={batches}")
    waited, waited_ahead, _ = run(folder, options, batches, eos, async_scheduling=False)
    ran_ahead, launched_ahead, llm = run(folder, options, batches, eos, async_scheduling=True)
    assert llm.engine.runs_ahead
    event(f"preemptions: {llm.engine.scheduler.num_preemptions > 0}")
    for reason in {reason for batch in waited for _, reason in batch}:
        event(f"finish reason: {reason}")
    assert waited_ahead == [0] * len(batches)
    assert ran_ahead == waited
    for batch, launched in zip(batches, launched_ahead):
        room = options.get("max_model_len", 10**9)
        if not any(params.has_penalties for _, params in batch) and \
                any(params.max_tokens >= 3 and len(prompt) + 3 <= room for prompt, params in batch):
            assert launched > 0
