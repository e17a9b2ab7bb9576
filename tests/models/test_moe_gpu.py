"""On a GPU: a mixture-of-experts model through the Triton grouped GEMM inside CUDA graphs (decode
graphs and piecewise prefill graphs) gives the greedy ids of transformers."""

import pytest
import torch

from pipemax import LLM, SamplingParams
from tests.runtime.test_engine import hf_greedy
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
