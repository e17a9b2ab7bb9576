"""fp8 KV cache end to end (float32 model on the CPU): the pools hold float8 with a float32 scale
per stored row and KV head, and greedy ids do not depend on the schedule (chunk size, offload,
chunked prefill, prefix caching, pipeline stages and micro-batches, the attention backend), since
a row's stored bits depend only on the row; "fp8" is e4m3; an fp8 pool holds more chunks in the
same budget, as kv_chunk_bytes counts them; the run's stats and summary name the KV dtype; a GPU
below sm_89 is refused in one line."""

from types import SimpleNamespace

import pytest
import torch

from pipemax import LLM, SamplingParams
from pipemax.batch.summary import describe_run
from pipemax.core.kv_dtype import kv_chunk_bytes
from pipemax.engine import llm_engine as engine_module
from pipemax.engine.config import ConfigError, EngineConfig
from pipemax.kernels.fp8 import FP8_FORMATS
from tests.helpers import assert_all_free_or_cached, settled_kv_managers
from tests.tiny_models import save_tiny_model

CHUNK = 8
MAX_TOKENS = 8
LAYERS = 2  # the smallest llama3 that still splits into two stages
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
KV_CACHE_GIB = 2**-14  # 64 KiB: 51 fp8 chunks of 8 tokens over both layers (the CPU's default would be 1 GiB)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer tiny llama3 (2 KV heads x 16) and prompts: three share a 21-token prefix (two
    full chunks of 8, ending mid-chunk), two stand alone; the longest is 35 tokens."""
    folder = tmp_path_factory.mktemp("tiny-fp8")
    hf = save_tiny_model("llama3", folder, num_hidden_layers=LAYERS)
    generator = torch.Generator().manual_seed(17)

    def tokens(n):
        return torch.randint(1, hf.config.vocab_size, (n,), generator=generator).tolist()

    system = tokens(21)
    prompts = [system + tokens(3), tokens(13), system + tokens(9), tokens(5), system + tokens(14)]
    return folder, hf.config, prompts


def run(folder, prompts, **options):
    """Greedy ids and the engine (closed) of one run: fp8, torch attention, chunks of 8, no prefix
    caching unless options say otherwise."""
    options = {"kv_cache_dtype": "fp8", "chunk_tokens": CHUNK, "attention_backend": "torch", "prefix_caching": False,
               "pipeline_transport": "inprocess", "kv_cache_gib": KV_CACHE_GIB, **options}
    with LLM(model=str(folder), **options) as llm:
        ids = [o.token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        stats = llm.last_run_stats
        return ids, stats, llm.engine


def pools(engine):
    return [stage.kv_pool for stage in engine.stages]


def fp8_chunk_bytes(hf_config, chunk_tokens=CHUNK, layers=LAYERS, storage="fp8_e4m3"):
    head_dim = hf_config.hidden_size // hf_config.num_attention_heads
    return kv_chunk_bytes(layers, hf_config.num_key_value_heads, head_dim, chunk_tokens, storage)


def assert_rows_hold_computed_scales(pool, fp8_dtype=torch.float8_e4m3fn):
    """The pool is fp8 with its scales; every stored row (scale > 0) maps its largest magnitude per
    KV head to the format's largest value: its scale is its own, computed when it was stored."""
    spec = pool.spec
    assert pool.gpu.dtype == fp8_dtype and spec.fp8
    assert pool.gpu_scales is not None and pool.gpu_scales.dtype == torch.float32
    assert tuple(pool.gpu_scales.shape) == (pool.num_gpu_chunks, spec.num_layers, 2, spec.chunk_tokens,
                                            spec.num_kv_heads)
    assert pool.fixed_scales is None  # a checkpoint without k_scale / v_scale
    written = pool.gpu_scales > 0
    assert int(written.sum()) >= spec.num_layers * 2 * spec.num_kv_heads * 20  # rows of K and V were stored
    largest = pool.gpu.float().abs().amax(dim=-1)  # [chunks, layers, 2, rows, heads]
    assert torch.equal(largest[written], torch.full_like(largest[written], FP8_FORMATS[fp8_dtype][2]))
    assert not largest[~written].any()  # an unwritten row is all zeros


def test_greedy_ids_do_not_depend_on_the_schedule(tiny):
    """One reference (fp8, chunks of 8, one stage, whole prefills, no prefix caching, no offload)
    against every schedule that splits or moves rows differently: the same ids."""
    folder, hf_config, prompts = tiny
    reference, stats, engine = run(folder, prompts)
    assert stats["kv_cache_dtype"] == "fp8_e4m3"
    assert len(engine.stages) == 1
    assert_rows_hold_computed_scales(engine.stages[0].kv_pool)

    ids, _, engine = run(folder, prompts, chunk_tokens=16)
    assert ids == reference, "chunk_tokens 16"
    assert engine.stages[0].kv_pool.spec.chunk_tokens == 16

    ids, stats, _ = run(folder, prompts, max_num_batched_tokens=9)  # prompts prefilled in pieces
    assert ids == reference, "chunked prefill"
    assert stats["steps"] > len(prompts) + MAX_TOKENS

    ids, stats, _ = run(folder, prompts, prefix_caching=True, max_num_seqs=2)
    assert ids == reference, "prefix caching"
    assert stats["prefix_cached_tokens"] >= 2 * 2 * CHUNK  # two requests took the shared prefix's chunks from the cache
    # 7 GPU chunks (the longest request needs 6): a preempted request's cached prefix chunk goes
    # to the host tier and comes back, scales with it
    chunk_gib = fp8_chunk_bytes(hf_config) / 2**30
    ids, stats, _ = run(folder, prompts, prefix_caching=True, max_num_seqs=2, kv_cache_gib=7 * chunk_gib,
                        host_memory_gib=40 * chunk_gib)
    assert ids == reference, "prefix caching through the host tier"
    assert stats["prefix_cache"]["demoted_chunks"] > 0 and stats["prefix_cache"]["promoted_chunks"] > 0

    for options in (dict(pipeline_parallel=2), dict(pipeline_parallel=2, micro_batches=2, max_num_seqs=2)):
        ids, stats, engine = run(folder, prompts, **options)
        assert ids == reference, options
        assert stats["stages"] == 2 and stats["kv_cache_dtype"] == "fp8_e4m3"
        for pool in pools(engine):
            assert pool.spec.num_layers == 1
            assert_rows_hold_computed_scales(pool)

    ids, stats, _ = run(folder, prompts, kv_cache_dtype="fp8_e4m3")
    assert ids == reference and stats["kv_cache_dtype"] == "fp8_e4m3", "fp8 is fp8_e4m3"


@pytest.mark.parametrize("options", [dict(), dict(pipeline_parallel=2, micro_batches=2)], ids=["p1", "p2-m2"])
def test_forced_offload_gives_the_ids_of_no_offload(tiny, options):
    """Every request host-resident: its rows reach the host pool by write-through and come back by
    prefetch, scales with them (a lost scale would change the attention that reads the row)."""
    folder, hf_config, prompts = tiny
    reference, _, _ = run(folder, prompts, **options)
    stage_chunk_bytes = fp8_chunk_bytes(hf_config)  # all layers: every stage's pool together
    ids, stats, engine = run(folder, prompts, offload="force", kv_cache_gib=12 * stage_chunk_bytes / 2**30,
                             host_memory_gib=200 * stage_chunk_bytes / 2**30, **options)
    assert ids == reference
    assert stats["offload"]["host_resident_requests"] == len(prompts)
    moved = stats["transfers"]
    assert moved["bytes_prefetched"] > 0 and moved["bytes_prefetched"] % stage_chunk_bytes == 0  # scales counted
    for pool in pools(engine):
        assert pool.host.dtype == torch.float8_e4m3fn and pool.host_scales is not None
        assert (pool.host_scales > 0).any()  # the write-through carried the rows' scales to the host
    assert_all_free_or_cached(settled_kv_managers(SimpleNamespace(engine=engine)))


@pytest.mark.interpreter
def test_triton_attention_gives_the_ids_of_the_torch_reference(tiny):
    """The Triton kernels (store, prefill and decode attention over fp8, through the interpreter)
    against the torch references: the same ids, the same rows' scales."""
    folder, _, prompts = tiny
    prompts = prompts[:2]  # a prefill of 24 tokens and one of 13, then decode: tiny, the interpreter is slow
    few = dict(max_num_seqs=2)
    reference, _, torch_engine = run(folder, prompts, **few)
    ids, stats, engine = run(folder, prompts, attention_backend="triton", **few)
    assert ids == reference
    pool = engine.stages[0].kv_pool
    assert pool.backend == "triton"
    assert_rows_hold_computed_scales(pool)
    # Layer 0's rows come from the embeddings through one projection and the rotary embedding
    # (the fused Triton kernel, or the torch reference): the same rows in the same chunks, their
    # scales equal but for float32 rounding, their fp8 values (nearly all) the same.
    expected = torch_engine.stages[0].kv_pool
    assert torch.equal(pool.gpu_scales[:, 0] > 0, expected.gpu_scales[:, 0] > 0)
    torch.testing.assert_close(pool.gpu_scales[:, 0], expected.gpu_scales[:, 0], rtol=1e-6, atol=0)
    same = pool.gpu[:, 0].view(torch.uint8) == expected.gpu[:, 0].view(torch.uint8)
    assert same.float().mean() >= 0.99


def test_e5m2_is_stored_as_e5m2_and_named_in_the_stats_and_summary(tiny):
    folder, _, prompts = tiny
    _, stats, engine = run(folder, prompts[:2], kv_cache_dtype="fp8_e5m2")
    assert stats["kv_cache_dtype"] == "fp8_e5m2"
    assert "fp8_e5m2 KV cache" in describe_run(stats)
    assert_rows_hold_computed_scales(engine.stages[0].kv_pool, torch.float8_e5m2)
    _, stats, _ = run(folder, prompts[:2])
    assert stats["kv_cache_dtype"] == "fp8_e4m3" and "fp8_e4m3 KV cache" in describe_run(stats)
    _, stats, engine = run(folder, prompts[:2], kv_cache_dtype="auto")
    assert stats["kv_cache_dtype"] == "float32" and "float32 KV cache" in describe_run(stats)
    pool = engine.stages[0].kv_pool
    assert pool.gpu.dtype == torch.float32 and pool.gpu_scales is None and pool.host_scales is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_an_fp8_pool_holds_more_chunks_in_the_same_budget(tiny, dtype):
    """The same kv_cache_gib holds as many chunks as kv_chunk_bytes says: an fp8 chunk is the
    model dtype's over its element size (2 or 4), plus 4 bytes of scale per row, layer, K/V and
    KV head. Two stages split the budget by their chunks together."""
    folder, hf_config, _ = tiny
    budget = 0.001  # GiB
    head_dim = hf_config.hidden_size // hf_config.num_attention_heads
    heads = hf_config.num_key_value_heads
    element = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    counts = {}
    for kv_cache_dtype, storage in (("auto", dtype), ("fp8", "fp8_e4m3")):
        for stages in (1, 2):
            with LLM(model=str(folder), dtype=dtype, kv_cache_dtype=kv_cache_dtype, kv_cache_gib=budget,
                     chunk_tokens=CHUNK, pipeline_parallel=stages, pipeline_transport="inprocess") as llm:
                engine = llm.engine
                counts[kv_cache_dtype, stages] = {pool.num_gpu_chunks for pool in pools(engine)}
                # every stage holds its own layers' chunks: the pool's element type says the storage
                assert {pool.gpu.dtype for pool in pools(engine)} == {
                    torch.float8_e4m3fn if storage.startswith("fp8") else getattr(torch, dtype)}
            chunk_bytes = sum(kv_chunk_bytes(1 if stages == 2 else LAYERS, heads, head_dim, CHUNK, storage)
                              for _ in range(stages))
            assert counts[kv_cache_dtype, stages] == {int(budget * 2**30) // chunk_bytes}, (kv_cache_dtype, stages)
    # the same figure from first principles: data at one byte an element, plus the scales
    data = 2 * LAYERS * CHUNK * heads * head_dim
    assert fp8_chunk_bytes(hf_config) == data + 2 * LAYERS * CHUNK * heads * 4
    auto, fp8 = counts["auto", 1].pop(), counts["fp8", 1].pop()
    overhead = 1 + 4 / head_dim  # the scales: 4 bytes for every head_dim elements of one byte
    assert element / overhead * 0.99 <= fp8 / auto <= element / overhead * 1.01


# ---- sm_89 ---------------------------------------------------------------------------------------

@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA build with one visible GPU of 80 GiB, whose capability the test sets."""
    gpu = SimpleNamespace(capability=(8, 0), name="NVIDIA A100-SXM4-80GB")
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "12.4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: gpu.capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: gpu.name)
    return gpu


@pytest.mark.parametrize("capability, refused", [
    ((7, 5), True), ((8, 0), True), ((8, 6), True), ((8, 9), False), ((9, 0), False), ((10, 0), False),
], ids=["sm75", "sm80", "sm86", "sm89", "sm90", "sm100"])
def test_fp8_needs_sm_89(tiny, fake_gpu, capability, refused):
    folder = str(tiny[0])
    fake_gpu.capability = capability
    for kv_cache_dtype in ("fp8", "fp8_e4m3", "fp8_e5m2"):
        if not refused:
            EngineConfig(model=folder, device="cuda", kv_cache_dtype=kv_cache_dtype)
            continue
        with pytest.raises(ConfigError) as raised:
            EngineConfig(model=folder, device="cuda:0", kv_cache_dtype=kv_cache_dtype)
        message = str(raised.value)
        assert raised.value.option == "kv_cache_dtype" and "\n" not in message
        assert message.startswith(f"kv_cache_dtype {kv_cache_dtype} needs a GPU with fp8 conversion (sm_89")
        assert f"{fake_gpu.name} is sm_{capability[0]}{capability[1]}" in message and "use auto" in message
    EngineConfig(model=folder, device="cuda", kv_cache_dtype="auto")  # the model's dtype runs anywhere
    EngineConfig(model=folder, device="cpu", kv_cache_dtype="fp8")  # the CPU runs the torch references


def test_the_sm_89_error_comes_before_weights_load(tiny, fake_gpu, monkeypatch):
    def load_model(*args, **kwargs):
        raise AssertionError("weights were loaded before the user error was reported")

    monkeypatch.setattr(engine_module, "load_model", load_model)
    fake_gpu.capability, fake_gpu.name = (8, 6), "NVIDIA GeForce RTX 3090"
    with pytest.raises(ConfigError, match="kv_cache_dtype fp8 needs .* NVIDIA GeForce RTX 3090 is sm_86"):
        LLM(model=str(tiny[0]), device="cuda", kv_cache_dtype="fp8")


def test_kv_cache_dtype_is_checked(tiny):
    with pytest.raises(ConfigError, match="kv_cache_dtype must be one of auto, fp8, fp8_e4m3, fp8_e5m2, got 'int8'"):
        EngineConfig(model=str(tiny[0]), kv_cache_dtype="int8")


def test_the_cli_takes_kv_cache_dtype():
    from pipemax.cli import build_parser, engine_options

    parser = build_parser()
    args = parser.parse_args(["serve-offline", "-i", "in.jsonl", "-o", "out.jsonl", "--kv-cache-dtype", "fp8_e5m2"])
    assert engine_options(args)["kv_cache_dtype"] == "fp8_e5m2"
    args = parser.parse_args(["serve-offline", "-i", "in.jsonl", "-o", "out.jsonl"])
    assert engine_options(args)["kv_cache_dtype"] == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve-offline", "-i", "in.jsonl", "-o", "out.jsonl", "--kv-cache-dtype", "int8"])
