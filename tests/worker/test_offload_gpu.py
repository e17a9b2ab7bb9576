"""On CUDA: with offload forced, prefetches and write-backs run on their own streams beside the
compute of the other micro-batches (seen in the events' times), and greedy ids equal offload off,
with and without CUDA graphs, also when compute is slowed so that a prefetch that did not wait for
its slot's last compute and write-through would overwrite KV still being read. Skipped where
there is no CUDA device."""

import pytest
import torch

from pipemax import LLM, SamplingParams
from tests.tiny_models import save_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_copies_overlap_compute_and_change_nothing(tmp_path, cuda_graphs):
    # Wide enough that a step takes a while, small enough to load in a moment.
    save_tiny_model("llama3", tmp_path, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                    num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=1024)
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 200, (n,), generator=generator).tolist() for n in (300, 120, 500, 64, 250, 410)]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    # Four micro-batches: each step's slot held another micro-batch's KV two steps before, so
    # every step prefetches (with two, a micro-batch comes back to its own slot's KV).
    common = dict(dtype="float32", device="cuda", chunk_tokens=16, cuda_graphs=cuda_graphs, micro_batches=4,
                  max_num_seqs=8)
    with LLM(model=str(tmp_path), kv_cache_gib=0.25, **common) as llm:
        reference = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    with LLM(model=str(tmp_path), kv_cache_gib=0.25, offload="force", host_memory_gib=1, **common) as llm:
        ids = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        stats = llm.last_run_stats
    assert ids == reference
    assert stats["transfers"]["bytes_prefetched"] > 0 and stats["transfers"]["bytes_written_back"] > 0
    # One micro-batch's prefetch runs while the other computes: part of the copy time is hidden.
    assert stats["copy_time_hidden_fraction"] > 0.2, stats


def test_a_slot_is_refilled_only_after_its_last_compute_and_write_through(tmp_path, monkeypatch):
    """Each step's compute is preceded by a long sleep kernel on the compute stream: a prefetch
    into the slot of step n that waited only for its own sequences (not for step n - 2, the slot's
    last user, still computing or writing through) would overwrite KV step n - 2 reads, and the
    ids would differ from offload off."""
    from pipemax.worker.model_runner import ModelRunner

    save_tiny_model("llama3", tmp_path, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 200, (n,), generator=generator).tolist() for n in (90, 40, 130, 60, 75, 110, 33, 52)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    common = dict(dtype="float32", device="cuda", chunk_tokens=16, cuda_graphs=False, micro_batches=4,
                  max_num_seqs=4, kv_cache_gib=0.02)
    with LLM(model=str(tmp_path), **common) as llm:
        reference = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    forward = ModelRunner.forward

    def slow_forward(self, *args, **kwargs):
        torch.cuda._sleep(20_000_000)  # ~10 ms of a spinning kernel on the compute stream
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "forward", slow_forward)
    with LLM(model=str(tmp_path), offload="force", host_memory_gib=1, prefix_caching=False, **common) as llm:
        ids = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        stats = llm.last_run_stats
    assert ids == reference
    assert stats["transfers"]["bytes_prefetched"] > 0 and stats["offload"]["host_resident_requests"] == len(prompts)


def test_prefetch_outranks_write_back_and_nccl_streams_are_high_priority():
    import torch.distributed as dist

    from pipemax.parallel.distributed import process_group_options
    from pipemax.worker.kv_pool import KVPool, KVPoolSpec
    from pipemax.worker.kv_transfers import KVTransfers

    pool = KVPool(KVPoolSpec(1, 1, 16, 16, torch.float16), 2, 2, "cuda")
    transfers = KVTransfers(pool)
    assert transfers.h2d.priority < transfers.d2h.priority  # lower is more urgent
    if dist.is_nccl_available():
        assert process_group_options("nccl").is_high_priority_stream
