"""On a GPU: a mixture-of-experts model through the Triton grouped GEMM inside CUDA graphs (decode
graphs and piecewise prefill graphs) gives the greedy ids of transformers."""

import pytest
import torch

from pipemax import LLM, SamplingParams
from tests.engine.test_engine import hf_greedy
from tests.tiny_models import save_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize("family", ["mixtral", "qwen2-moe"])
def test_moe_under_cuda_graphs_equals_transformers(family, tmp_path):
    hf = save_tiny_model(family, tmp_path)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, hf.config.vocab_size, (n,), generator=generator).tolist() for n in (5, 40, 17)]
    with LLM(model=str(tmp_path), dtype="float32", device="cuda", chunk_tokens=16, max_num_seqs=8,
             max_num_batched_tokens=64) as llm:
        assert llm.engine.config.cuda_graphs and llm.engine.stages[0].runner.decode_graphs is not None
        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    assert [o.token_ids for o in outputs] == [hf_greedy(hf, p, 10) for p in prompts]


def test_a_mixtral_shaped_model_runs_bf16_under_cuda_graphs():
    """Mixtral-8x7B's layer shape (2 layers, random weights) in bfloat16 with the real tiles:
    decode and piecewise graphs replay the grouped GEMMs, and every request gets its tokens."""
    from bench.bench_throughput import hf_config
    from pipemax.engine.llm_engine import EngineConfig, LLMEngine
    from pipemax.models import build_model, model_config_from_hf

    config = model_config_from_hf(hf_config("mixtral-8x7b-2l"))
    torch.manual_seed(0)
    model = build_model(config, device="cuda", dtype=torch.bfloat16)
    for param in model.parameters():
        torch.nn.init.normal_(param, std=0.02)
    engine = LLMEngine(EngineConfig(model="random:mixtral", dtype="bfloat16", device="cuda", max_num_seqs=32,
                                    max_num_batched_tokens=512, kv_cache_gib=1.0), model=model)
    runner = engine.stages[0].runner
    assert runner.decode_graphs is not None and runner.piecewise_graphs is not None
    generator = torch.Generator().manual_seed(1)
    for length in (7, 130, 300, 45):
        engine.add_request(torch.randint(0, config.vocab_size, (length,), generator=generator).tolist(),
                           SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    finished = list(engine.run())
    assert sorted(len(done.output_token_ids) for done in finished) == [12] * 4
    assert engine.last_run_stats["steps"] >= 12
