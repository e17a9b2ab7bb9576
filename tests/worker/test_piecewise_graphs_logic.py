"""Steps with prefill pieces under piecewise CUDA graphs, checked on the CPU: static buffers, token
buckets and their padding, attention launched between the pieces on the real token count, the
per-layer write-through called between them. A stand-in graph re-runs its captured piece
as a real replay would (into the tensors it was captured with, Python state not re-run), so
everything but the capture itself runs."""

import pytest
import torch

from pipemax import LLM, SamplingParams
from pipemax.worker.piecewise_graphs import PiecewiseGraphs, token_buckets
from tests.tiny_models import save_tiny_model

pytestmark = pytest.mark.interpreter


class StandInPiece:
    """A captured piece as a real replay behaves: it reads the tensors bound when it was captured
    and writes into the tensors it allocated then; the Python attributes it set are not set again
    (so nothing can read a piece's output through Python state after capture)."""

    def __init__(self, owner, bucket, index):
        self.owner, self.bucket, self.index = owner, bucket, index
        state = owner.states[bucket]
        self.before = dict(vars(state))
        owner.piece(bucket, index)  # the "capture"
        self.after = dict(vars(state))

    def replay(self):
        state = self.owner.states[self.bucket]
        final = dict(vars(state))
        vars(state).clear()
        vars(state).update(self.before)
        self.owner.piece(self.bucket, self.index)
        for name, tensor in vars(state).items():
            captured = self.after.get(name)
            if isinstance(tensor, torch.Tensor) and captured is not None and tensor is not captured:
                captured.copy_(tensor)
        vars(state).clear()
        vars(state).update(final)


class StandInPiecewiseGraphs(PiecewiseGraphs):
    @torch.inference_mode()
    def _capture(self):
        from types import SimpleNamespace

        for bucket in reversed(self.buckets):
            self.states[bucket] = SimpleNamespace()
            for index in range(self.num_pieces):  # warm-up
                self.piece(bucket, index)
            self.graphs[bucket] = [StandInPiece(self, bucket, index) for index in range(self.num_pieces)]


def test_token_buckets():
    assert token_buckets(32) == [32] and token_buckets(300) == [64, 128, 256, 300] and token_buckets(512)[-1] == 512


def run(folder, prompts, params, piecewise, **options):
    llm = LLM(model=str(folder), dtype="float32", device="cpu", attention_backend="triton", chunk_tokens=8,
              max_num_batched_tokens=32, **options)
    for stage in llm.engine.stages:
        runner = stage.runner
        if piecewise:
            runner.piecewise_graphs = StandInPiecewiseGraphs(runner.model, runner.attention, 32, runner.device,
                                                             max_samples=4)
            runner.piecewise_graphs.capture()
            calls = []
            original = runner.piecewise_graphs.run
            runner.piecewise_graphs.run = lambda *args, original=original, calls=calls: calls.append(1) or original(*args)
            runner.piecewise_calls = calls
    ids = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    return ids, llm


def test_steps_with_prefill_give_the_ids_of_eager_steps(tmp_path):
    # Two layers: pieces between attentions, and a last piece with the LM head.
    save_tiny_model("qwen3", tmp_path, max_position_embeddings=256, num_hidden_layers=2)
    generator = torch.Generator().manual_seed(2)
    # Prompts longer than a step (chunked prefill) beside decodes: mixed steps of many sizes.
    prompts = [torch.randint(0, 211, (n,), generator=generator).tolist() for n in (5, 40, 12, 17, 3)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (5, 3, 5, 3, 4)]
    params[2] = SamplingParams(temperature=0.9, seed=3, max_tokens=5, ignore_eos=True)
    options = dict(max_num_seqs=4, kv_cache_gib=0.01)
    eager, _ = run(tmp_path, prompts, params, False, **options)
    pieces, llm = run(tmp_path, prompts, params, True, **options)
    assert pieces == eager
    assert llm.engine.stages[0].runner.piecewise_calls  # the steps did run through the pieces


def test_two_stages_and_forced_offload_write_through_between_pieces(tmp_path):
    save_tiny_model("llama3", tmp_path, max_position_embeddings=256, num_hidden_layers=2)  # a layer a stage
    generator = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 211, (n,), generator=generator).tolist() for n in (20, 9, 33)]
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    options = dict(max_num_seqs=4, kv_cache_gib=0.01, pipeline_parallel=2, pipeline_transport="inprocess",
                   micro_batches=2, offload="force",
                   host_memory_gib=0.01)
    eager, plain = run(tmp_path, prompts, params, False, **options)
    pieces, graphed = run(tmp_path, prompts, params, True, **options)
    assert pieces == eager
    # Each prompt's KV went to the host layer by layer, between the pieces, exactly as eagerly.
    assert graphed.last_run_stats["transfers"]["bytes_written_back"] == \
        plain.last_run_stats["transfers"]["bytes_written_back"]
    assert graphed.last_run_stats["transfers"]["bytes_offloaded"] == 0
    assert all(stage.runner.piecewise_calls for stage in graphed.engine.stages)
