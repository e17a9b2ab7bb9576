"""An fp8 checkpoint's KV-cache scales: per-layer self_attn.k_scale / v_scale (also
self_attn.attn.k_scale / v_scale, and one self_attn.kv_scale for both) land in each layer's
kv_scale buffer; an fp8 engine stores every row at that layer with them (saturating) instead of
computed ones, on each stage its own layers'; a scale that is not a positive number is refused; a
checkpoint without them leaves zeros, and the rows' scales are computed."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipemax import LLM, SamplingParams
from pipemax.kernels.fp8 import FP8_FORMATS
from pipemax.models import WeightLoadError, load_model
from tests.tiny_models import save_tiny_model

LAYERS = 2
CHUNK = 8
# (k_scale, v_scale) per layer: small enough that the tiny model's largest K and V saturate
SCALES = [(0.0125, 0.00875), (0.015, 0.01)]
FIXED = torch.tensor(SCALES, dtype=torch.float32)  # as the checkpoint holds them
E4M3_MAX = FP8_FORMATS[torch.float8_e4m3fn][2]


def with_tensors(source, target, extra: dict, drop=()):
    """A copy of the tiny checkpoint at `source` in `target`, with `extra` tensors added."""
    target.mkdir()
    for file in source.iterdir():
        if file.name != "model.safetensors":
            (target / file.name).write_bytes(file.read_bytes())
    tensors = {name: tensor for name, tensor in load_file(source / "model.safetensors").items() if name not in drop}
    save_file({**tensors, **extra}, target / "model.safetensors", metadata={"format": "pt"})
    return target


def scale_tensors(names=("self_attn.k_scale", "self_attn.v_scale"), scales=SCALES):
    return {f"model.layers.{layer}.{name}": torch.tensor(scales[layer][index], dtype=torch.float32)
            for layer in range(LAYERS) for index, name in enumerate(names)}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-no-scales")
    hf = save_tiny_model("llama3", folder, num_hidden_layers=LAYERS)
    generator = torch.Generator().manual_seed(23)
    prompts = [torch.randint(1, hf.config.vocab_size, (n,), generator=generator).tolist() for n in (19, 6, 11)]
    return folder, prompts


@pytest.fixture(scope="module")
def scaled(plain, tmp_path_factory):
    return with_tensors(plain[0], tmp_path_factory.mktemp("scaled") / "model", scale_tensors())


def run(folder, prompts, max_tokens=6, **options):
    """Greedy requests with an fp8 KV cache: their ids and each stage's pool (the engine closed)."""
    options = {"kv_cache_dtype": "fp8", "chunk_tokens": CHUNK, "attention_backend": "torch", "kv_cache_gib": 2**-14,
               "prefix_caching": False, "pipeline_transport": "inprocess", **options}
    with LLM(model=str(folder), **options) as llm:
        outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                               use_tqdm=False)
        return [o.token_ids for o in outputs], [stage.kv_pool for stage in llm.engine.stages]


def assert_rows_hold_fixed_scales(pool, fixed: torch.Tensor, rows: int = 20, largest: float = E4M3_MAX):
    """Every stored row (scale > 0) at layer l of K (V) has the scale fixed[l, 0] (fixed[l, 1]);
    rows were stored at every layer, and some saturated at the format's largest value."""
    for layer in range(pool.spec.num_layers):
        for kv in range(2):
            scales = pool.gpu_scales[:, layer, kv]
            written = scales > 0
            assert int(written.sum()) >= rows * pool.spec.num_kv_heads, (layer, kv)
            assert torch.equal(scales[written], torch.full_like(scales[written], float(fixed[layer, kv]))), (layer, kv)
    # the rows' values beyond 448 x scale (e4m3) were saturated, not rescaled
    assert pool.gpu.float().abs().amax() == largest


def test_the_loader_reads_k_scale_and_v_scale_of_every_layer(scaled, plain):
    model = load_model(scaled)
    assert torch.equal(model.kv_cache_scales(), FIXED)
    for layer in range(LAYERS):
        assert torch.equal(model.layers[layer].kv_scale, FIXED[layer])
    # a stage reads its own layers' scales only
    assert torch.equal(load_model(scaled, 1, 2).kv_cache_scales(), FIXED[1:])
    # float32 buffers whatever the model's dtype (a bfloat16 scale would round)
    assert torch.equal(load_model(scaled, dtype=torch.bfloat16).kv_cache_scales(), FIXED)
    # the weights are the checkpoint's either way
    reference = load_model(plain[0])
    for (name, param), (_, expected) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(param, expected), name


def test_a_checkpoint_without_scales_leaves_zeros_and_rows_get_computed_scales(plain):
    folder, prompts = plain
    model = load_model(folder)
    assert all(layer.kv_scale.tolist() == [0.0, 0.0] for layer in model.layers)
    assert model.kv_cache_scales() is None
    _, (pool,) = run(folder, prompts)
    assert pool.fixed_scales is None
    written = pool.gpu_scales > 0
    assert int(written.sum()) >= LAYERS * 2 * 20 * pool.spec.num_kv_heads
    # computed: each row's largest magnitude per head maps to 448, and the scales differ row to row
    largest = pool.gpu.float().abs().amax(dim=-1)
    assert torch.equal(largest[written], torch.full_like(largest[written], E4M3_MAX))
    assert pool.gpu_scales[written].unique().numel() > 20


@pytest.mark.parametrize("names", [("self_attn.k_scale", "self_attn.v_scale"),
                                   ("self_attn.attn.k_scale", "self_attn.attn.v_scale")], ids=["k_scale", "attn"])
def test_an_fp8_engine_stores_rows_with_the_checkpoint_scales(plain, names, tmp_path):
    folder = with_tensors(plain[0], tmp_path / "model", scale_tensors(names))
    _, (pool,) = run(folder, plain[1])
    assert torch.equal(pool.fixed_scales, FIXED)
    assert_rows_hold_fixed_scales(pool, FIXED)


@pytest.mark.parametrize("kv_cache_dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_values_beyond_the_checkpoint_scale_saturate(plain, tmp_path, kv_cache_dtype):
    """Scales that map 0.5 to the format's largest value: K and V beyond it are stored as that
    value (e5m2 would overflow to inf without the clamp), never inf or NaN."""
    fp8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[kv_cache_dtype]
    largest = FP8_FORMATS[fp8][2]
    scales = [(0.5 / largest, 0.5 / largest)] * LAYERS
    folder = with_tensors(plain[0], tmp_path / "model", scale_tensors(scales=scales))
    _, (pool,) = run(folder, plain[1], kv_cache_dtype=kv_cache_dtype)
    assert pool.gpu.dtype == fp8
    assert_rows_hold_fixed_scales(pool, torch.tensor(scales), largest=largest)
    values = pool.gpu.float()
    assert torch.isfinite(values).all()
    assert int((values.abs() == largest).sum()) > values.numel() // 100  # many saturated


@pytest.mark.interpreter
def test_the_triton_store_uses_the_checkpoint_scales(scaled, plain):
    """The Triton kernels (fused rotary + store, attention; the interpreter) store with the fixed
    scales too, and give the torch reference's ids."""
    prompts = plain[1][1:2]  # 6 tokens, 3 new: tiny, the interpreter is slow
    reference, _ = run(scaled, prompts, max_tokens=3)
    ids, (pool,) = run(scaled, prompts, max_tokens=3, attention_backend="triton")
    assert ids == reference and pool.backend == "triton"
    assert torch.equal(pool.fixed_scales, FIXED)
    assert_rows_hold_fixed_scales(pool, FIXED, rows=8)


def test_each_stage_stores_with_its_own_layers_scales(scaled, plain):
    """Two stages of one layer each: each pool takes its layer's scales; the ids are one stage's."""
    reference, _ = run(scaled, plain[1])
    ids, pools = run(scaled, plain[1], pipeline_parallel=2, micro_batches=2)
    assert ids == reference and len(pools) == 2
    for layer, pool in enumerate(pools):  # one layer a stage
        assert torch.equal(pool.fixed_scales, FIXED[layer:layer + 1])
        assert_rows_hold_fixed_scales(pool, FIXED[layer:layer + 1])


def test_the_model_dtype_kv_cache_ignores_the_scales(scaled, plain):
    _, (pool,) = run(scaled, plain[1][:1], kv_cache_dtype="auto")
    assert pool.gpu.dtype == torch.float32 and pool.fixed_scales is None and pool.gpu_scales is None


def test_one_kv_scale_sets_both_and_a_missing_one_is_computed(plain, tmp_path):
    folder, prompts = plain
    both = {f"model.layers.{layer}.self_attn.kv_scale": torch.tensor([SCALES[layer][0]]) for layer in range(LAYERS)}
    model = load_model(with_tensors(folder, tmp_path / "both", both))
    assert torch.equal(model.kv_cache_scales(), FIXED[:, :1].expand(LAYERS, 2))
    # only k_scale: V's rows get computed scales (0 = none), K's the checkpoint's
    only_k = {name: tensor for name, tensor in scale_tensors().items() if name.endswith("k_scale")}
    folder = with_tensors(folder, tmp_path / "only-k", only_k)
    k_only = torch.stack([FIXED[:, 0], torch.zeros(LAYERS)], dim=1)
    assert torch.equal(load_model(folder).kv_cache_scales(), k_only)
    _, (pool,) = run(folder, prompts)
    assert torch.equal(pool.fixed_scales, k_only)
    for layer in range(LAYERS):
        k_scales, v_scales = pool.gpu_scales[:, layer, 0], pool.gpu_scales[:, layer, 1]
        assert k_scales[k_scales > 0].unique().tolist() == [FIXED[layer, 0].item()]
        assert v_scales[v_scales > 0].unique().numel() > 20  # computed row by row
    # a scale per channel: its largest (the per-tensor scale that saturates no channel's more)
    per_channel = {f"model.layers.{layer}.self_attn.k_scale": torch.stack([FIXED[layer, 0] / 2, FIXED[layer, 0]])
                   for layer in range(LAYERS)}
    model = load_model(with_tensors(folder, tmp_path / "per-channel", per_channel, drop=only_k))
    assert torch.equal(model.kv_cache_scales(), k_only)


@pytest.mark.parametrize("value", [
    0.0,
    -0.02,
    float("nan"),
    float("inf"),
], ids=["zero", "negative", "nan", "inf"])
def test_a_scale_that_is_not_a_positive_number_is_refused(plain, tmp_path, value):
    tensors = scale_tensors()
    tensors["model.layers.1.self_attn.k_scale"] = torch.tensor(value)
    folder = with_tensors(plain[0], tmp_path / "model", tensors)
    with pytest.raises(WeightLoadError, match=r"model\.layers\.1\.self_attn\.k_scale is .*: a KV scale must be a "
                                              r"positive number"):
        load_model(folder)
