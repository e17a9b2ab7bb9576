"""On CUDA: a decoder layer's eager forward launches no more than a budget of device operations,
counted with torch.profiler. The fused layer needs about ten (the norm fused with the residual
add, the qkv matmul, rotary + q/k norm + KV store in one, attention, the output matmul, the norm
again, the gate|up matmul, SiLU x up, the down matmul); unfused it took ~35 more. Layers are
counted as the difference between a 4-layer and a 2-layer model over the same steps, so the
per-step work (embedding, sampling, uploads) cancels out. Skipped without a CUDA device."""

import pytest
import torch
from torch.autograd import DeviceType

from pipemax import LLM, SamplingParams
from tests.tiny_models import save_tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
LAUNCHES_PER_LAYER_STEP = 14  # ~10 fused, with room for a GEMM that splits in two


def device_operations(folder, prompts, params) -> tuple[int, int]:
    """(device operations, steps) of one eager run."""
    with LLM(model=str(folder), dtype="bfloat16", device="cuda", chunk_tokens=16, cuda_graphs=False,
             max_num_seqs=8, kv_cache_gib=0.05) as llm:
        llm.generate(prompts, params, use_tqdm=False)  # warm-up: compiles the kernels
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
            llm.generate(prompts, params, use_tqdm=False)
            torch.cuda.synchronize()
        steps = llm.last_run_stats["steps"]
    count = sum(event.count for event in profile.key_averages() if event.device_type == DeviceType.CUDA)
    return count, steps


def test_a_fused_layer_stays_within_its_launch_budget(tmp_path):
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 200, (n,), generator=generator).tolist() for n in (30, 7, 18)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    counts = {}
    for layers in (2, 4):
        folder = tmp_path / f"layers{layers}"
        save_tiny_model("llama3", folder, num_hidden_layers=layers, max_position_embeddings=256)
        counts[layers] = device_operations(folder, prompts, params)
    (two, steps), (four, steps_four) = counts[2], counts[4]
    assert steps == steps_four
    per_layer_step = (four - two) / (2 * steps)
    assert per_layer_step <= LAUNCHES_PER_LAYER_STEP, f"{per_layer_step:.1f} device operations per layer and step"
