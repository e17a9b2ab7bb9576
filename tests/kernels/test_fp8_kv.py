"""fp8 KV: the store kernels quantise (a scale per row and KV head), attention dequantises in
registers, copies move the fp8 bytes and their scales. Each kernel against its torch reference,
which quantises and dequantises explicitly."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipemax.kernels import (
    copy_chunks,
    copy_chunks_ref,
    copy_rows,
    copy_rows_ref,
    decode_attention,
    decode_attention_ref,
    dequantize_ref,
    prefill_attention,
    prefill_attention_ref,
    quantize_ref,
    rope_store_kv,
    rope_store_kv_ref,
    store_kv,
    store_kv_ref,
)
from pipemax.kernels.fp8 import FP8_DTYPES, FP8_FORMATS
from pipemax.models.rope import RotaryEmbedding
from tests.helpers import DTYPES, assert_close, examples, random_chunk_tables

E4M3, E5M2 = FP8_DTYPES


def fp8_pool(generator, num_chunks, layers, chunk_tokens, kv_heads, head_dim, fp8, spread=1.0):
    """An fp8 pool and its scales, every row stored through the reference from random float32 rows
    whose heads differ in size by up to `spread` orders of magnitude (scales per head matter)."""
    pool = torch.zeros(num_chunks, layers, 2, chunk_tokens, kv_heads, head_dim, dtype=fp8)
    scales = torch.zeros(num_chunks, layers, 2, chunk_tokens, kv_heads)
    slots = torch.arange(num_chunks * chunk_tokens)
    for layer in range(layers):
        size = 10.0 ** (spread * torch.rand(len(slots), kv_heads, 1, generator=generator))
        k = torch.randn(len(slots), kv_heads, head_dim, generator=generator) * size
        v = torch.randn(len(slots), kv_heads, head_dim, generator=generator) * size
        store_kv_ref(k, v, pool, layer, slots, scales)
    return pool, scales


def slot_case(data, capacity, max_tokens=12):
    """Distinct slots (a step never writes one twice), some skipped with -1 (padding)."""
    slots = data.draw(st.lists(st.integers(0, capacity - 1), min_size=1, max_size=min(capacity, max_tokens),
                               unique=True), label="slots")
    keep = data.draw(st.lists(st.booleans(), min_size=len(slots), max_size=len(slots)), label="keep")
    return torch.tensor([slot if k else -1 for slot, k in zip(slots, keep)], dtype=torch.int64)


# --- rounding and the store ---------------------------------------------------------------------


@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=["e4m3", "e5m2"])
def test_kernel_rounding_is_torchs_cast_over_the_whole_range(device, fp8):
    """With a fixed scale of 1 the store kernel's rounding meets every binade of the format:
    subnormals, the smallest normal, ties, the largest value and saturation beyond it. The
    stored bits are torch's cast (round to nearest even) of the clamped value, bit for bit."""
    largest = FP8_FORMATS[fp8][2]
    magnitudes = torch.logspace(math.log10(2.0 ** -20), math.log10(largest * 4), 4000)
    # every fp8 value, and every midpoint between neighbours (the ties)
    grid = torch.arange(256, dtype=torch.uint8).view(fp8).float()
    grid = grid[torch.isfinite(grid)].unique()
    values = torch.cat([magnitudes, grid, (grid[1:] + grid[:-1]) / 2])
    values = torch.cat([values, -values, torch.zeros(3)])
    head_dim = 64
    tokens = -(-values.numel() // head_dim)
    padded = torch.zeros(tokens * head_dim)
    padded[:values.numel()] = values
    k = padded.view(tokens, 1, head_dim)
    pool = torch.zeros(-(-tokens // 16), 1, 2, 16, 1, head_dim, dtype=fp8)
    scales = torch.zeros(pool.shape[:5])
    fixed = torch.ones(1, 2)
    slots = torch.arange(tokens)
    actual_pool, actual_scales = pool.to(device), scales.to(device)
    store_kv(k.to(device), k.to(device), actual_pool, 0, slots.to(device), actual_scales, fixed.to(device))
    stored = actual_pool.cpu()[:, 0, 0].reshape(-1, head_dim)[:tokens].reshape(-1)
    expected = padded.clamp(-largest, largest).to(fp8)
    expected.view(torch.uint8)[expected.view(torch.uint8) == 0x80] = 0  # +0 for zeros
    assert torch.equal(stored.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(actual_scales.cpu()[:, 0, 0].reshape(-1)[:tokens], torch.ones(tokens))


@settings(max_examples=examples(25))
@given(
    chunk_tokens=st.sampled_from([8, 16, 32]),
    num_chunks=st.integers(1, 4),
    kv_heads=st.sampled_from([1, 2, 3, 8]),
    head_dim=st.sampled_from([64, 80, 128]),
    layers=st.integers(1, 3),
    dtype=st.sampled_from(DTYPES),
    fp8=st.sampled_from(FP8_DTYPES),
    fixed=st.sampled_from([None, "checkpoint", "tiny"]),
    data=st.data(),
)
def test_store_kv_quantises_as_the_reference_bit_for_bit(device, chunk_tokens, num_chunks, kv_heads, head_dim,
                                                         layers, dtype, fp8, fixed, data):
    capacity = num_chunks * chunk_tokens
    slot_mapping = slot_case(data, capacity)
    layer = data.draw(st.integers(0, layers - 1), label="layer")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    generator = torch.Generator().manual_seed(seed)
    tokens = slot_mapping.shape[0]
    size = 10.0 ** (3 * torch.rand(tokens, kv_heads, 1, generator=generator) - 1.5)  # heads of unlike size
    k = (torch.randn(tokens, kv_heads, head_dim, generator=generator) * size).to(dtype)
    v = (torch.randn(tokens, kv_heads, head_dim, generator=generator) * size).to(dtype)
    if data.draw(st.booleans(), label="zero row"):  # an all-zero row: scale 0, stored as zeros
        k[0] = 0
    pool, scales = fp8_pool(generator, num_chunks, layers, chunk_tokens, kv_heads, head_dim, fp8)
    # a checkpoint's scales: ample, or small enough that most values saturate
    fixed_scales = None if fixed is None else torch.rand(layers, 2, generator=generator) * \
        (0.1 if fixed == "checkpoint" else 1e-4) + 1e-6

    expected_pool, expected_scales = pool.clone(), scales.clone()
    store_kv_ref(k, v, expected_pool, layer, slot_mapping, expected_scales, fixed_scales)
    actual_pool, actual_scales = pool.to(device, copy=True), scales.to(device, copy=True)
    store_kv(k.to(device), v.to(device), actual_pool, layer, slot_mapping.to(device), actual_scales,
             None if fixed_scales is None else fixed_scales.to(device))
    assert torch.equal(actual_pool.cpu().view(torch.uint8), expected_pool.view(torch.uint8))
    assert torch.equal(actual_scales.cpu(), expected_scales)

    # The reference itself: what was stored is the row to within half an fp8 step of its scale.
    kept = slot_mapping >= 0
    chunks, rows = slot_mapping[kept] // chunk_tokens, slot_mapping[kept] % chunk_tokens
    mantissa, min_normal_exponent, largest = FP8_FORMATS[fp8]
    for index, new in ((0, k[kept].float()), (1, v[kept].float())):
        row_scales = expected_scales[chunks, layer, index, rows]  # [tokens, heads]
        restored = dequantize_ref(expected_pool[chunks, layer, index, rows], row_scales[..., None])
        if fixed_scales is None:
            assert torch.equal(row_scales, new.abs().amax(dim=2) * torch.tensor(1 / largest))
            error = (restored - new).abs()
            # half a step: of the value's binade, or below the normal range the fixed subnormal step
            subnormal_step = 2.0 ** (min_normal_exponent - mantissa)
            allowed = new.abs() * 2.0 ** -(mantissa + 1) + row_scales[..., None] * subnormal_step / 2
            assert (error <= allowed * 1.0001 + 1e-30).all()
        else:
            assert torch.equal(row_scales, torch.full_like(row_scales, float(fixed_scales[layer, index])))
    # rows not written are as they were, scales too
    untouched = torch.ones(capacity, dtype=torch.bool)
    untouched[slot_mapping[kept]] = False
    flat = lambda t: t.movedim(3, 1).reshape(capacity, -1)  # noqa: E731  (slot-major)
    assert torch.equal(flat(actual_scales.cpu())[untouched], flat(scales)[untouched])


@settings(max_examples=examples(12))
@given(tokens=st.integers(1, 9), kv_heads=st.sampled_from([1, 2]), group=st.sampled_from([1, 4]),
       head_dim=st.sampled_from([64, 128]), dtype=st.sampled_from(DTYPES), fp8=st.sampled_from(FP8_DTYPES),
       qk_norm=st.booleans(), fixed=st.booleans(), data=st.data())
def test_rope_store_kv_quantises_as_the_reference(device, tokens, kv_heads, group, head_dim, dtype, fp8, qk_norm,
                                                  fixed, data):
    heads, chunk_tokens, num_chunks, layers = kv_heads * group, 8, 2, 2
    capacity = num_chunks * chunk_tokens
    slot_mapping = slot_case(data, capacity, max_tokens=tokens)
    tokens = slot_mapping.shape[0]
    seed = data.draw(st.integers(0, 2**16), label="seed")
    generator = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 300, (tokens,), generator=generator)
    rotary = RotaryEmbedding(type("C", (), {"rope_theta": 10000.0})(), head_dim, 512)
    cos, sin = rotary.cos[positions], rotary.sin[positions]
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=generator) * 4).to(dtype)
    norms = (torch.randn(head_dim, generator=generator).to(dtype),) * 2 if qk_norm else (None, None)
    fixed_scales = torch.rand(layers, 2, generator=generator) * 0.02 + 1e-3 if fixed else None
    pool, scales = fp8_pool(generator, num_chunks, layers, chunk_tokens, kv_heads, head_dim, fp8)
    layer = 1

    expected_qkv, expected_pool, expected_scales = qkv.clone(), pool.clone(), scales.clone()
    expected_q = rope_store_kv_ref(expected_qkv, cos, sin, expected_pool, layer, slot_mapping, heads, *norms,
                                   kv_scales=expected_scales, fixed_scales=fixed_scales)
    qkv_dev, pool_dev, scales_dev = qkv.to(device, copy=True), pool.to(device, copy=True), scales.to(device, copy=True)
    q = rope_store_kv(qkv_dev, cos.to(device), sin.to(device), pool_dev, layer, slot_mapping.to(device), heads,
                      *(n.to(device) if n is not None else None for n in norms), kv_scales=scales_dev,
                      fixed_scales=None if fixed_scales is None else fixed_scales.to(device))
    assert_close(q, expected_q, dtype, row_ulps=4)
    kept = slot_mapping >= 0
    chunks, rows = slot_mapping[kept] // chunk_tokens, slot_mapping[kept] % chunk_tokens
    # v is stored as given: bit for bit. k is rotated first, where the kernel and torch may differ by
    # a few ulps of the model's dtype; quantised, that is at most one fp8 step of the row's scale.
    assert torch.equal(pool_dev.cpu()[chunks, layer, 1, rows].view(torch.uint8),
                       expected_pool[chunks, layer, 1, rows].view(torch.uint8))
    assert torch.equal(scales_dev.cpu()[chunks, layer, 1, rows], expected_scales[chunks, layer, 1, rows])
    assert_close(scales_dev.cpu()[chunks, layer, 0, rows], expected_scales[chunks, layer, 0, rows], dtype)
    restored = dequantize_ref(pool_dev.cpu()[chunks, layer, 0, rows], scales_dev.cpu()[chunks, layer, 0, rows, :, None])
    expected_k = dequantize_ref(expected_pool[chunks, layer, 0, rows], expected_scales[chunks, layer, 0, rows, :, None])
    step = expected_scales[chunks, layer, 0, rows, :, None] * FP8_FORMATS[fp8][2] * 2.0 ** -FP8_FORMATS[fp8][0]
    assert ((restored - expected_k).abs() <= step * 1.01 + 1e-6).all()
    other_layer = 1 - layer
    assert torch.equal(pool_dev.cpu()[:, other_layer].view(torch.uint8), pool[:, other_layer].view(torch.uint8))


# --- attention ----------------------------------------------------------------------------------


@st.composite
def attention_cases(draw, decode: bool):
    chunk_tokens = draw(st.sampled_from([8, 16]))
    batch = draw(st.integers(1, 3))
    # lengths from a single token to a few chunks, usually ending mid-chunk
    seq_lens = draw(st.lists(st.integers(1, 3 * chunk_tokens + 5), min_size=batch, max_size=batch))
    new_lens = [1] * batch if decode else [draw(st.integers(0, length)) for length in seq_lens]
    return dict(chunk_tokens=chunk_tokens, seq_lens=seq_lens, new_lens=new_lens,
                kv_heads=draw(st.sampled_from([1, 2])), group=draw(st.sampled_from([1, 2, 4])),
                head_dim=draw(st.sampled_from([64, 80, 128])), dtype=draw(st.sampled_from(DTYPES)),
                fp8=draw(st.sampled_from(FP8_DTYPES)), seed=draw(st.integers(0, 2**16)))


def attention_inputs(case):
    generator = torch.Generator().manual_seed(case["seed"])
    num_chunks, tables = random_chunk_tables(generator, case["seq_lens"], case["chunk_tokens"])
    # heads up to twice each other's size: a wrong head's scale shows, and values stay near 1, where
    # the tolerances of the model's dtype are absolute
    pool, scales = fp8_pool(generator, num_chunks, 2, case["chunk_tokens"], case["kv_heads"], case["head_dim"],
                            case["fp8"], spread=0.3)
    q = torch.randn(sum(case["new_lens"]), case["kv_heads"] * case["group"], case["head_dim"],
                    generator=generator).to(case["dtype"])
    return q, pool, scales, tables


def dequantised_pool(pool, scales, dtype):
    """The fp8 pool as a pool of the model's dtype: what attention over it must compute."""
    return dequantize_ref(pool, scales[..., None]).to(dtype)


@settings(max_examples=examples(20))
@given(case=attention_cases(decode=True))
def test_decode_attention_dequantises_as_the_reference(device, case):
    q, pool, scales, tables = attention_inputs(case)
    seq_lens = torch.tensor(case["seq_lens"], dtype=torch.int32)
    scale = 1 / math.sqrt(case["head_dim"])
    expected = decode_attention_ref(q, pool, 1, tables, seq_lens, scale, kv_scales=scales)
    actual = decode_attention(q.to(device), pool.to(device), 1, tables.to(device), seq_lens.to(device), scale,
                              block_n=16, kv_scales=scales.to(device))
    assert actual.dtype == q.dtype
    assert_close(actual, expected)
    if case["dtype"] == torch.float32:  # the reference is attention over the dequantised values
        plain = decode_attention_ref(q, dequantised_pool(pool, scales, torch.float32), 1, tables, seq_lens, scale)
        assert_close(expected, plain)


@settings(max_examples=examples(15))
@given(case=attention_cases(decode=False))
def test_prefill_attention_dequantises_as_the_reference(device, case):
    q, pool, scales, tables = attention_inputs(case)
    seq_lens = torch.tensor(case["seq_lens"], dtype=torch.int32)
    cu_seqlens = torch.tensor([0, *torch.tensor(case["new_lens"]).cumsum(0).tolist()], dtype=torch.int32)
    scale = 1 / math.sqrt(case["head_dim"])
    expected = prefill_attention_ref(q, pool, 1, tables, cu_seqlens, seq_lens, scale, kv_scales=scales)
    actual = prefill_attention(q.to(device), pool.to(device), 1, tables.to(device), cu_seqlens.to(device),
                               seq_lens.to(device), scale, block_m=16, block_n=16, kv_scales=scales.to(device))
    assert_close(actual, expected)
    if case["dtype"] == torch.float32:
        plain = prefill_attention_ref(q, dequantised_pool(pool, scales, torch.float32), 1, tables, cu_seqlens,
                                      seq_lens, scale)
        assert_close(expected, plain)


def test_fp8_attention_stays_near_attention_over_the_unquantised_kv():
    """What quantisation costs: attention over fp8 KV with per-row scales, against the float32 KV it
    was made from. Each element is off by ~2.5% (e4m3) / ~5% (e5m2) rms; attention over them by
    ~7% / ~7% here (a single query: a small output); a wrong scale would be off by ~100%."""
    generator = torch.Generator().manual_seed(0)
    seq_len, kv_heads, head_dim, chunk_tokens = 200, 2, 64, 16
    num_chunks, tables = random_chunk_tables(generator, [seq_len], chunk_tokens)
    exact = torch.randn(num_chunks, 1, 2, chunk_tokens, kv_heads, head_dim, generator=generator)
    for fp8, tolerance in ((E4M3, 0.08), (E5M2, 0.16)):
        pool = torch.zeros(exact.shape, dtype=fp8)
        scales = torch.zeros(exact.shape[:5])
        slots = torch.arange(num_chunks * chunk_tokens)
        k = exact[:, 0, 0].reshape(-1, kv_heads, head_dim)
        v = exact[:, 0, 1].reshape(-1, kv_heads, head_dim)
        store_kv_ref(k, v, pool, 0, slots, scales)
        q = torch.randn(1, kv_heads * 4, head_dim, generator=generator) * 3
        lengths = torch.tensor([seq_len], dtype=torch.int32)
        quantised = decode_attention_ref(q, pool, 0, tables, lengths, 0.125, kv_scales=scales)
        reference = decode_attention_ref(q, exact, 0, tables, lengths, 0.125)
        relative = (quantised - reference).norm() / reference.norm()
        assert relative < tolerance, f"{fp8}: relative error {relative:.4f}"


# --- copies -------------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["host_to_gpu", "gpu_to_host", "gpu_to_gpu"])
@settings(max_examples=examples(8))
@given(chunk_tokens=st.sampled_from([8, 16]), layers=st.integers(1, 3), kv_heads=st.sampled_from([1, 2, 3]),
       head_dim=st.sampled_from([64, 128]), fp8=st.sampled_from(FP8_DTYPES), rows=st.booleans(), data=st.data())
def test_copies_move_fp8_bytes_and_their_scales_exactly(device, direction, chunk_tokens, layers, kv_heads, head_dim,
                                                        fp8, rows, data):
    src_chunks, dst_chunks = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))
    generator = torch.Generator().manual_seed(src_chunks * 7 + dst_chunks)
    src, src_scales = fp8_pool(generator, src_chunks, layers, chunk_tokens, kv_heads, head_dim, fp8)
    dst, dst_scales = fp8_pool(generator, dst_chunks, layers, chunk_tokens, kv_heads, head_dim, fp8)
    pin = device.type == "cuda"
    place = lambda t, host: (t.pin_memory() if pin else t.clone()) if host else t.to(device, copy=True)  # noqa: E731
    src_dev, src_scales_dev = place(src, direction == "host_to_gpu"), place(src_scales, direction == "host_to_gpu")
    dst_dev, dst_scales_dev = place(dst, direction == "gpu_to_host"), place(dst_scales, direction == "gpu_to_host")
    expected, expected_scales = dst.clone(), dst_scales.clone()
    ids = lambda values: torch.tensor(values, dtype=torch.int32, device=device)  # noqa: E731
    if rows:
        count = data.draw(st.integers(0, 6))
        src_ids = data.draw(st.lists(st.integers(0, src_chunks - 1), min_size=count, max_size=count))
        pairs = data.draw(st.lists(st.tuples(st.integers(0, dst_chunks - 1), st.integers(0, chunk_tokens - 1)),
                                   min_size=count, max_size=count, unique=True))
        dst_ids, token_rows = [p[0] for p in pairs], [p[1] for p in pairs]
        layer_start = data.draw(st.integers(0, layers - 1))
        num_layers = data.draw(st.integers(0, layers - layer_start))
        copy_rows_ref(src, expected, *(torch.tensor(x) for x in (src_ids, dst_ids, token_rows)), layer_start,
                      num_layers, src_scales, expected_scales)
        copy_rows(src_dev, dst_dev, ids(src_ids), ids(dst_ids), ids(token_rows), layer_start, num_layers,
                  src_scales_dev, dst_scales_dev)
    else:
        count = data.draw(st.integers(0, min(src_chunks, dst_chunks)))
        src_ids = data.draw(st.lists(st.integers(0, src_chunks - 1), min_size=count, max_size=count))
        dst_ids = data.draw(st.lists(st.integers(0, dst_chunks - 1), min_size=count, max_size=count, unique=True))
        copy_chunks_ref(src, expected, torch.tensor(src_ids), torch.tensor(dst_ids), src_scales, expected_scales)
        copy_chunks(src_dev, dst_dev, ids(src_ids), ids(dst_ids), src_scales_dev, dst_scales_dev)
    if device.type == "cuda":
        torch.cuda.synchronize()
    assert torch.equal(dst_dev.cpu().view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(dst_scales_dev.cpu(), expected_scales)


def test_an_fp8_chunk_is_half_the_bytes_of_a_bf16_chunk():
    shape = (1, 4, 2, 16, 2, 128)
    bf16 = torch.zeros(shape, dtype=torch.bfloat16)
    fp8 = torch.zeros(shape, dtype=E4M3)
    scales = torch.zeros(shape[:5])
    assert fp8.nbytes * 2 == bf16.nbytes
    assert (fp8.nbytes + scales.nbytes) / bf16.nbytes == pytest.approx(0.5 + 4 / (2 * 128))


# --- checks -------------------------------------------------------------------------------------


def test_fp8_pools_need_their_scales_and_others_refuse_them():
    pool = torch.zeros(2, 1, 2, 8, 1, 64, dtype=E4M3)
    k = torch.zeros(1, 1, 64)
    slots = torch.zeros(1, dtype=torch.int64)
    with pytest.raises(ValueError, match="needs kv_scales"):
        store_kv_ref(k, k, pool, 0, slots)
    with pytest.raises(ValueError, match="kv_scales must be"):
        store_kv_ref(k, k, pool, 0, slots, torch.zeros(2, 1, 2, 8, 1, dtype=torch.float16))
    with pytest.raises(ValueError, match="go with an fp8 pool"):
        store_kv_ref(k, k, torch.zeros(2, 1, 2, 8, 1, 64), 0, slots, torch.zeros(2, 1, 2, 8, 1))
    with pytest.raises(ValueError, match="fixed_scales must be"):
        store_kv_ref(k, k, pool, 0, slots, torch.zeros(2, 1, 2, 8, 1), torch.ones(2, 2))
    with pytest.raises(ValueError, match="needs src_scales"):
        copy_chunks_ref(pool, pool.clone(), torch.zeros(1, dtype=torch.int64), torch.ones(1, dtype=torch.int64))
    q = torch.zeros(1, 1, 64)
    with pytest.raises(ValueError, match="needs kv_scales"):
        decode_attention_ref(q, pool, 0, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 1.0)


def test_quantize_ref_saturates_and_stores_positive_zero():
    x = torch.tensor([1e6, -1e6, -0.0, 0.0, 1.0])
    quantised = quantize_ref(x, torch.tensor(1.0), E4M3)
    assert quantised.float().tolist() == [448.0, -448.0, 0.0, 0.0, 1.0]
    assert quantised.view(torch.uint8)[2] == 0
