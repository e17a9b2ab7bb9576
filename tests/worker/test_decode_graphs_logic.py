"""The bookkeeping of decode under CUDA graphs, checked on the CPU: static buffers, bucket padding
(slot -1, one-token rows), the split plan computed on the device per step, the LM head and the
greedy argmax inside the graph (beside seeded random rows). A stand-in graph replays the
captured forward eagerly into the same static output, so everything but the capture itself runs."""

import importlib

import pytest
import torch

from pipemax import LLM, SamplingParams
from pipemax.worker.cuda_graphs import DecodeGraphs
from tests.tiny_models import save_tiny_model

pytestmark = pytest.mark.interpreter

# The package re-exports the launcher under the module's name: fetch the module itself.
decode_module = importlib.import_module("pipemax.kernels.decode_attention")


class EagerGraph:
    def __init__(self, replay):
        self.replay = replay


class EagerDecodeGraphs(DecodeGraphs):
    @torch.inference_mode()
    def _capture(self):
        for batch in reversed(self.buckets):
            self.outputs[batch] = self._forward(batch)
            self.graphs[batch] = EagerGraph(lambda batch=batch: self._replay(batch))

    def _replay(self, batch):
        fresh, static = self._forward(batch), self.outputs[batch]
        for source, target in zip(fresh, static) if isinstance(static, tuple) else [(fresh, static)]:
            target.copy_(source)


@pytest.mark.parametrize("target_programs", [24, 1], ids=["splits", "one-split"])
def test_graph_decode_path_matches_eager(tmp_path, monkeypatch, target_programs):
    # Several splits per sequence, as on a GPU with many SMs: some are empty for short sequences
    # (a 5-token one has one tile of work for four splits), some long ones end mid-split. Or one
    # split (a batch that fills the GPU): no split plan in the graph at all.
    monkeypatch.setattr(decode_module, "_target_programs", lambda device, tiles_key=(): target_programs)
    plans = []
    split_plan = decode_module.decode_split_plan
    monkeypatch.setattr(decode_module, "decode_split_plan", lambda *args: plans.append(args) or split_plan(*args))
    # The smallest run that still crosses every path: two layers (per-layer static buffers), five
    # requests through three slots (buckets 1, 2 and 3 replayed, padded rows), a prompt longer
    # than a step (chunked prefill), greedy and seeded rows in one batch.
    save_tiny_model("qwen3", tmp_path, max_position_embeddings=256, num_hidden_layers=2)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 211, (n,), generator=generator).tolist() for n in (5, 33, 12, 7, 21)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (9, 4, 6, 2, 7)]
    # Seeded random rows beside greedy ones: the graph's argmax is the greedy rows' choice only.
    params[1] = SamplingParams(temperature=0.8, seed=5, max_tokens=4, ignore_eos=True)
    params[4] = SamplingParams(temperature=1.2, top_k=20, seed=6, max_tokens=7, ignore_eos=True)
    results = []
    for graphs in (False, True):
        llm = LLM(model=str(tmp_path), dtype="float32", device="cpu", attention_backend="triton", max_num_seqs=3,
                  kv_cache_gib=0.01, chunk_tokens=8, max_num_batched_tokens=32)
        runner = llm.engine.runner
        if graphs:
            runner.decode_graphs = EagerDecodeGraphs(runner.model, runner.attention, 3, llm.engine.max_model_len, 8,
                                                     runner.device)
            runner.decode_graphs.capture()
            assert runner.decode_graphs.buckets == [1, 2, 3]
        results.append([o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        assert llm.engine.last_run_stats["steps_launched_ahead"] > 0  # graphs take carried input ids too
    assert results[0] == results[1]
    assert bool(plans) == (target_programs > 1)
