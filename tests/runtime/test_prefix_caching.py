"""Prefix caching end to end (issue 12, offload off): greedy ids are identical with caching on
and off, for one stage and two, with prefixes ending mid-chunk and on a chunk boundary, under
preemption; the reused tokens are counted; after a job every chunk is free or cached."""

import pytest
import torch

from pipemax import LLM, SamplingParams
from pipemax.runtime.kv_manager import ChunkState
from tests.tiny_models import save_tiny_model

CHUNK = 8
MAX_TOKENS = 6


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
    return folder, prompts


def run(folder, prompts, **options):
    with LLM(model=str(folder), chunk_tokens=CHUNK, **{"max_num_seqs": 2, **options}) as llm:
        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                               use_tqdm=False)
        stats = llm.last_run_stats
        stages = llm.engine.stages
        leftover = [(state, refs) for stage in stages for state, refs in
                    ((stage.kv.gpu.states, stage.kv.cache_refs),)]
        return [o.token_ids for o in outputs], stats, leftover, llm.engine.kv


# (one sequence per micro-batch with two stages: admitted in turn, later requests find the cache)
@pytest.mark.parametrize("options", [dict(), dict(pipeline_parallel=2, pipeline_transport="inprocess", max_num_seqs=1),
                                     dict(pipeline_parallel=2, max_num_seqs=1),  # stage processes replay the ops
                                     dict(kv_cache_gib=6 * 8 * 3 * 2 * 32 * 4 / 2**30)],  # 6 chunks: preemptions
                         ids=["one-stage", "two-stages", "stage-processes", "preemption"])
def test_outputs_are_identical_with_caching_on_and_off(tiny, options):
    folder, prompts = tiny
    reference, _, _, _ = run(folder, prompts, **options)
    ids, stats, leftover, kv = run(folder, prompts, prefix_caching=True, **options)
    assert ids == reference
    assert stats["prefix_cached_tokens"] >= 2 * CHUNK  # later requests reused the shared prefixes
    if "kv_cache_gib" in options:
        assert stats["preemptions"] > 0  # sequences holding shared chunks were preempted and came back
    for states, refs in leftover + [(kv.gpu.states, kv.cache_refs)]:  # every chunk free or cached
        assert all(state in (ChunkState.FREE, ChunkState.CACHED) for state in states)
        assert all(count == 0 for count in refs.values())


def test_prefix_caching_with_offload_is_refused_for_now(tiny):
    folder, _ = tiny
    with pytest.raises(ValueError, match="offload off"):
        LLM(model=str(folder), prefix_caching=True, offload="force")
