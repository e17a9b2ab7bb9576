"""End to end through LLM.generate on tiny random models: greedy ids equal transformers', and do
not depend on chunk size, kernel backend, prefill mode, step budget or preemption."""

import pytest
import torch

from pipemax import LLM, SamplingParams
from tests.tiny_models import save_tiny_model

# Lengths cross 8-token chunks and end mid-chunk; the longest spans several prefill steps.
PROMPT_LENGTHS = [3, 8, 13, 30, 21]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama3")
    hf = save_tiny_model("llama3", folder)
    generator = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, hf.config.vocab_size, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]
    return folder, hf, prompts


def hf_greedy(hf, prompt, max_tokens, **options):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,
                          eos_token_id=None, pad_token_id=0, **options)
    return out[0, len(prompt):].tolist()


def greedy(llm, prompt, **options):
    """One greedy request of MAX_TOKENS (EOS ignored unless options say otherwise)."""
    params = SamplingParams(**{"temperature": 0, "max_tokens": MAX_TOKENS, "ignore_eos": True, **options})
    return llm.generate([prompt], params, use_tqdm=False)[0]


def assert_greedy_within_margin(hf, prompt, output, margin=1e-3):
    """Teacher forcing: every chosen token is transformers' argmax, or within `margin` of it."""
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + output])).logits[0, len(prompt) - 1:-1]
    chosen = logits.gather(1, torch.tensor(output)[:, None]).squeeze(1)
    gap = logits.max(dim=1).values - chosen
    assert (gap <= margin).all(), f"chosen tokens trail the argmax by {gap.max().item():.4f}"


def generate(folder, prompts, **options):
    llm = LLM(model=str(folder), **options)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [o.token_ids for o in outputs], llm


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_greedy_equals_transformers_generate(tiny, backend):
    folder, hf, prompts = tiny
    ids, _ = generate(folder, prompts, attention_backend=backend, chunk_tokens=8, max_num_batched_tokens=16)
    for prompt, output in zip(prompts, ids):
        assert len(output) == MAX_TOKENS
        assert_greedy_within_margin(hf, prompt, output)
        assert output == hf_greedy(hf, prompt, MAX_TOKENS)


def test_outputs_do_not_depend_on_chunk_size_mode_budget_or_batch(tiny):
    folder, _, prompts = tiny
    reference, _ = generate(folder, prompts, chunk_tokens=8)
    variants = [
        dict(chunk_tokens=64),
        dict(chunk_tokens=8, prefill_mode="separate", max_num_batched_tokens=7),
        dict(chunk_tokens=16, max_num_seqs=2),
    ]
    for options in variants:
        ids, _ = generate(folder, prompts, **options)
        assert ids == reference, options


def test_preemption_recomputes_and_loses_nothing(tiny):
    folder, _, prompts = tiny
    reference, _ = generate(folder, prompts, chunk_tokens=8)
    # 8 chunks of 8 tokens: not enough for all five sequences at once, enough for the longest.
    chunk_bytes = 2 * 3 * 8 * 2 * 16 * 4
    ids, llm = generate(folder, prompts, chunk_tokens=8, kv_cache_gib=8 * chunk_bytes / 2**30)
    assert llm.engine.scheduler.num_preemptions > 0
    assert ids == reference


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(tiny):
    folder, _, prompts = tiny
    llm = LLM(model=str(folder))
    seeded = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234, max_tokens=MAX_TOKENS, ignore_eos=True)
    others = SamplingParams(temperature=1.0, max_tokens=5, ignore_eos=True)
    alone = llm.generate([prompts[3]], seeded, use_tqdm=False)[0].token_ids
    batch = llm.generate(prompts, [others, others, others, seeded, others], use_tqdm=False)
    assert batch[3].token_ids == alone
    different_seed = SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=99, max_tokens=MAX_TOKENS, ignore_eos=True)
    assert llm.generate([prompts[3]], different_seed, use_tqdm=False)[0].token_ids != alone


def test_stop_tokens_max_tokens_and_logprobs(tiny):
    folder, hf, prompts = tiny
    llm = LLM(model=str(folder))
    free = llm.generate([prompts[2]], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                                     logprobs=True), use_tqdm=False)[0]
    assert free.finish_reason == "length" and len(free.token_ids) == MAX_TOKENS
    with torch.no_grad():
        logits = hf(torch.tensor([prompts[2] + free.token_ids])).logits[0, len(prompts[2]) - 1:-1]
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(free.token_ids)[:, None]).squeeze(1)
    assert torch.allclose(torch.tensor(free.logprobs), expected, atol=1e-4)

    stop_at = free.token_ids[4]
    stopped = llm.generate([prompts[2]], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                                        stop_token_ids=[stop_at]), use_tqdm=False)[0]
    first = free.token_ids.index(stop_at)
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[: first + 1]


def test_eos_stops_unless_ignored(tiny):
    folder, _, prompts = tiny
    llm = LLM(model=str(folder))
    free = greedy(llm, prompts[0])
    llm.engine.eos_token_ids = {free.token_ids[2]}
    stopped = greedy(llm, prompts[0], ignore_eos=False)
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) <= 3
    assert greedy(llm, prompts[0]).token_ids == free.token_ids


def test_prompt_too_long_fails_before_any_work(tiny):
    folder, _, _ = tiny
    llm = LLM(model=str(folder), max_model_len=32)
    with pytest.raises(ValueError, match="maximum context is 32"):
        llm.generate([[1] * 10, [1] * 40], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.engine.has_unfinished()


def test_generation_stops_at_max_model_len(tiny):
    folder, _, prompts = tiny
    llm = LLM(model=str(folder), max_model_len=34)
    out = llm.generate([prompts[3]], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True), use_tqdm=False)[0]
    assert out.finish_reason == "length" and len(prompts[3]) + len(out.token_ids) == 34


def test_repetition_penalty_matches_transformers(tiny):
    folder, hf, prompts = tiny
    llm = LLM(model=str(folder))
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, repetition_penalty=1.8)
    ours = llm.generate(prompts[:3], params, use_tqdm=False)  # one batch: penalties are per row
    for prompt, out in zip(prompts[:3], ours):
        assert out.token_ids == hf_greedy(hf, prompt, MAX_TOKENS, repetition_penalty=1.8)


def test_min_tokens_holds_back_eos(tiny):
    folder, _, prompts = tiny
    llm = LLM(model=str(folder))
    free = greedy(llm, prompts[1])
    llm.engine.eos_token_ids = {free.token_ids[0]}
    held = greedy(llm, prompts[1], ignore_eos=False, min_tokens=4)
    assert len(held.token_ids) >= 4 and free.token_ids[0] not in held.token_ids[:4]


def test_a_cpu_engine_keeps_torch_to_half_the_cores_unless_told(tiny, monkeypatch):
    """A single-process CPU engine sets torch's threads (all the cores collapse on a busy machine:
    engine/cpu_threads.py); OMP_NUM_THREADS, or a count this process set itself, is kept."""
    from pipemax.engine import cpu_threads

    assert [cpu_threads.default_cpu_threads(cores) for cores in (1, 2, 3, 16)] == [1, 1, 1, 8]
    assert cpu_threads.choose_cpu_threads({}, cores=2, threads_now=2, threads_at_import=2) == 1
    assert cpu_threads.choose_cpu_threads({"OMP_NUM_THREADS": "2"}, 2, 2, 2) is None  # the user's choice
    assert cpu_threads.choose_cpu_threads({}, 16, 4, 16) is None  # a replica's share of the cores
    folder, _, _ = tiny
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 6)
    monkeypatch.setattr(cpu_threads, "_THREADS_AT_IMPORT", before)  # nothing chose a count since the import
    try:
        llm = LLM(model=str(folder))
        assert torch.get_num_threads() == 3
        assert llm.engine.step_cost_key["device"] == "cpu x 3 threads"
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(before)
        LLM(model=str(folder))
        assert torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)



def test_a_saved_step_cost_fit_far_off_this_run_is_dropped_and_said_so(tiny, tmp_path, monkeypatch):
    """A fit saved under other conditions (here: 1000x too slow) seeds the next engine, is dropped
    at its first steps, and the summary's figure is this run's own model's, with the drop said."""
    import json

    from pipemax.core.cost_model import describe_step_time_model

    folder, _, prompts = tiny
    monkeypatch.setenv("PIPEMAX_PROFILES", str(tmp_path))
    generate(folder, prompts)
    [saved] = tmp_path.glob("step-costs-*.json")
    record = json.loads(saved.read_text())
    saved.write_text(json.dumps({**record, "coefficients": [1000 * c + 1.0 for c in record["coefficients"]]}))
    _, llm = generate(folder, prompts)
    stats = llm.engine.last_run_stats["cost_model"]
    assert stats["seeded_from"] == str(saved) and stats["seed_dropped"] and stats["seed_relative_error"] > 10
    assert stats["mean_relative_error"] is None or stats["mean_relative_error"] < stats["seed_relative_error"]
    assert "the saved step-cost profile it started from was off by" in describe_step_time_model(stats)
