"""Prefix caching end to end (issue 12): outputs are identical with caching on and off (float32,
CPU), greedy and seeded, for one stage and two (in one process and as stage processes), with
offload forced or auto, under preemption, through the host tier, with prefixes ending mid-chunk
and on a chunk boundary; the reused tokens are counted; a batch sharing a prefix computes it
once; after a job every chunk is free or cached."""

import pytest
import torch

from pipemax import LLM, SamplingParams
from tests.helpers import assert_all_free_or_cached, settled_kv_managers
from tests.tiny_models import save_tiny_model

CHUNK = 8
MAX_TOKENS = 6
CHUNK_BYTES = CHUNK * 3 * 2 * 2 * 16 * 4  # the tiny llama3: 3 layers, K and V, 2 heads x 16, float32


def gib(chunks: int) -> float:
    return chunks * CHUNK_BYTES / 2**30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-prefix")
    hf = save_tiny_model("llama3", folder)
    generator = torch.Generator().manual_seed(7)
    system = torch.randint(0, hf.config.vocab_size, (21,), generator=generator).tolist()  # ends mid-chunk
    boundary = torch.randint(0, hf.config.vocab_size, (16,), generator=generator).tolist()  # ends on one
    prompts = [system + torch.randint(0, hf.config.vocab_size, (n,), generator=generator).tolist()
               for n in (3, 9, 1, 14)]
    prompts += [boundary + torch.randint(0, hf.config.vocab_size, (n,), generator=generator).tolist()
                for n in (0, 5, 8)]
    prompts.append(list(boundary))  # the same prompt again, two full chunks: its last token is computed anew
    prompts.append(system + [1, 2])
    return folder, prompts


GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


def run(folder, prompts, params=GREEDY, **options):
    with LLM(model=str(folder), chunk_tokens=CHUNK, **{"max_num_seqs": 2, **options}) as llm:
        outputs = llm.generate(prompts, params, use_tqdm=False)
        stats = llm.last_run_stats
        managers = settled_kv_managers(llm)
        return [o.token_ids for o in outputs], stats, managers


@pytest.fixture(scope="module")
def reference(tiny):
    folder, prompts = tiny
    return run(folder, prompts, prefix_caching=False)[0]


@pytest.mark.parametrize("options", [
    dict(),
    dict(pipeline_parallel=2, pipeline_transport="inprocess", max_num_seqs=1),
    # stage processes replay the ops
    pytest.param(dict(pipeline_parallel=2, max_num_seqs=1), marks=pytest.mark.subprocess),
    dict(kv_cache_gib=gib(6)),  # 6 chunks: preemptions of sequences holding shared chunks
    dict(kv_cache_gib=gib(7), host_memory_gib=gib(40)),  # the host tier: demoted, then promoted
    dict(offload="force", micro_batches=4, kv_cache_gib=gib(18), host_memory_gib=gib(200)),  # a ring of 2 x 6
    dict(offload="auto", pipeline_parallel=2, pipeline_transport="inprocess", kv_cache_gib=gib(10),
         host_memory_gib=gib(200), prefetch_gbs=100.0),
], ids=["one-stage", "two-stages", "stage-processes", "preemption", "host-tier", "offload-force", "offload-auto"])
def test_outputs_are_identical_with_caching_on_and_off(tiny, reference, options):
    folder, prompts = tiny
    ids, stats, managers = run(folder, prompts, prefix_caching=True, **options)
    assert ids == reference
    cache = stats["prefix_cache"]
    assert stats["prefix_cached_tokens"] == cache["reused_tokens"] >= 2 * CHUNK  # later requests reused prefixes
    assert cache["prompt_tokens"] >= sum(map(len, prompts))
    if "kv_cache_gib" in options and "host_memory_gib" not in options:
        assert stats["preemptions"] > 0  # sequences holding shared chunks were preempted and came back
    if options.get("host_memory_gib") and options.get("offload") is None:
        assert cache["demoted_chunks"] > 0 and cache["promoted_chunks"] > 0
    if options.get("pipeline_transport") != "distributed" and options.get("pipeline_parallel", 1) == 1 \
            or options.get("pipeline_transport") == "inprocess":
        assert_all_free_or_cached(managers)


def test_seeded_sampling_is_identical_with_caching_on_and_off(tiny):
    folder, prompts = tiny
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=MAX_TOKENS, ignore_eos=True)
              for i in range(len(prompts))]
    off = run(folder, prompts, params, prefix_caching=False)[0]
    on, stats, _ = run(folder, prompts, params, prefix_caching=True)
    assert on == off and stats["prefix_cached_tokens"] > 0


def test_a_shared_prefix_is_computed_once_though_its_requests_arrive_together(tiny, reference):
    """Eight requests share 2 full chunks; all fit one step. Without deferral, each would compute
    them; with it, the first does and the others wait one step, then reuse both chunks."""
    folder, prompts = tiny
    sharers = prompts[:4] + prompts[-1:]  # the 21-token system prompt, then 3, 9, 1, 14 and 2 tokens
    ids, stats, _ = run(folder, sharers, prefix_caching=True, max_num_seqs=8)
    assert ids == [reference[i] for i in (0, 1, 2, 3, len(prompts) - 1)]
    assert stats["prefix_cached_tokens"] == 4 * 2 * CHUNK


def test_prefix_caching_is_checked(tiny):
    folder, _ = tiny
    with pytest.raises(ValueError, match="prefix_caching must be True or False"):
        LLM(model=str(folder), prefix_caching="yes")


def test_the_cache_outlives_a_run_and_waiting_requests_run_in_prefix_order(tiny, reference):
    folder, prompts = tiny
    with LLM(model=str(folder), chunk_tokens=CHUNK, max_num_seqs=2) as llm:
        first = llm.generate(prompts[:1], GREEDY, use_tqdm=False)[0].token_ids
        again = llm.generate(prompts[:1], GREEDY, use_tqdm=False)[0].token_ids
        assert first == again == reference[0] and llm.last_run_stats["prefix_cached_tokens"] == 2 * CHUNK  # 24 tokens: all but the last
        scheduler = llm.engine.scheduler
        interleaved = [prompts[4], prompts[0], prompts[5], prompts[1]]  # boundary, system, boundary, system
        for prompt in interleaved:
            llm.engine.add_request(prompt, GREEDY)
        scheduler.order_waiting_by_prefix()
        assert [seq.token_ids for seq in scheduler.waiting] == [prompts[4], prompts[5], prompts[0], prompts[1]]
        assert [result.output_token_ids for result in sorted(llm.engine.run(), key=lambda r: r.seq_id)] == \
            [reference[4], reference[0], reference[5], reference[1]]


def test_data_parallel_replicas_get_whole_prefix_groups():
    from pipemax.engine.data_parallel import split_requests

    shared = list(range(40))
    requests = [(i, (shared if i % 2 else [100 + i] * 40) + [i], GREEDY) for i in range(8)]
    batches = split_requests(requests, 2, CHUNK)
    holders = [index for index, batch in enumerate(batches) if any(seq_id % 2 for seq_id, _, _ in batch)]
    assert len(holders) == 1 and sorted(r[0] for batch in batches for r in batch) == list(range(8))
    assert [len(batch) for batch in split_requests(requests, 2, None)] == [4, 4]  # caching off: by work only


def test_requests_that_finish_in_their_first_step_still_leave_their_prefix_cached(tiny):
    """max_tokens=1 (scoring, classification): a request finishes in the step that computes its
    prompt; its chunks are indexed before they are freed, so its sharers reuse them."""
    folder, prompts = tiny
    sharers = prompts[:4] + prompts[-1:]
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    off = run(folder, sharers, one, prefix_caching=False)[0]
    on, stats, _ = run(folder, sharers, one, prefix_caching=True, max_num_seqs=8)
    assert on == off and stats["prefix_cached_tokens"] == 4 * 2 * CHUNK
