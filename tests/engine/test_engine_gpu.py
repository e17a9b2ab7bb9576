"""On CUDA, in bf16 and fp16: the engine's greedy tokens stay within a small logit margin of
transformers' argmax (teacher forcing: prompt + output scored in one forward pass), with and
without CUDA graphs. Skipped where there is no CUDA device."""

import pytest
import torch

from pipemax import LLM, SamplingParams
from tests.tiny_models import save_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def check_margin(hf, prompt, output, relative_margin):
    """Each chosen token trails the argmax by at most relative_margin of that position's logit range."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + output], device="cuda")).logits[0, len(prompt) - 1:-1].float()
    chosen = logits.gather(1, torch.tensor(output, device="cuda")[:, None]).squeeze(1)
    gap = logits.max(dim=1).values - chosen
    spread = logits.max(dim=1).values - logits.min(dim=1).values
    assert (gap <= relative_margin * spread).all(), f"worst gap {(gap / spread).max().item():.3f} of the logit range"


@pytest.mark.parametrize("dtype", sorted(DTYPES))
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_greedy_within_margin_of_transformers(tmp_path, dtype, cuda_graphs):
    hf = save_tiny_model("llama3", tmp_path, max_position_embeddings=256).to("cuda", DTYPES[dtype])
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, hf.config.vocab_size, (n,), generator=generator).tolist() for n in (3, 17, 40, 9)]
    llm = LLM(model=str(tmp_path), dtype=dtype, device="cuda", chunk_tokens=16, cuda_graphs=cuda_graphs,
              max_num_seqs=8, kv_cache_gib=0.05)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        assert len(out.token_ids) == 16
        check_margin(hf, prompt, out.token_ids, relative_margin=0.02)


def test_cuda_graphs_change_nothing_in_float32(tmp_path):
    save_tiny_model("qwen3", tmp_path, max_position_embeddings=256)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 211, (n,), generator=generator).tolist() for n in (5, 33, 12)]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    results = []
    for graphs in (False, True):
        llm = LLM(model=str(tmp_path), dtype="float32", device="cuda", cuda_graphs=graphs, max_num_seqs=4,
                  kv_cache_gib=0.05)
        results.append([o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
    assert results[0] == results[1]
