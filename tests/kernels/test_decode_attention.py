import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pipemax.kernels import decode_attention, decode_attention_ref
from pipemax.kernels.decode_attention import choose_num_splits
from tests.helpers import DTYPES, assert_close, random_chunk_tables


@st.composite
def decode_cases(draw):
    chunk_tokens = draw(st.sampled_from([8, 16, 32]))
    batch = draw(st.integers(1, 4))
    # From a single token to a few chunks, usually ending mid-chunk.
    seq_lens = draw(st.lists(st.integers(1, 4 * chunk_tokens + 5), min_size=batch, max_size=batch))
    return dict(
        chunk_tokens=chunk_tokens,
        seq_lens=seq_lens,
        num_kv_heads=draw(st.sampled_from([1, 2])),
        group_size=draw(st.sampled_from([1, 2, 4, 8])),
        head_dim=draw(st.sampled_from([64, 80, 96, 128])),
        num_layers=draw(st.integers(1, 3)),
        dtype=draw(st.sampled_from(DTYPES)),
        num_splits=draw(st.sampled_from([None, 1, 2, 3])),
        seed=draw(st.integers(0, 2**16)),
    )


def run_case(case, device):
    generator = torch.Generator().manual_seed(case["seed"])
    num_chunks, tables = random_chunk_tables(generator, case["seq_lens"], case["chunk_tokens"])
    num_heads = case["num_kv_heads"] * case["group_size"]
    pool = torch.randn(
        num_chunks, case["num_layers"], 2, case["chunk_tokens"], case["num_kv_heads"], case["head_dim"],
        generator=generator,
    ).to(case["dtype"])
    q = torch.randn(len(case["seq_lens"]), num_heads, case["head_dim"], generator=generator).to(case["dtype"])
    layer = case["num_layers"] - 1
    seq_lens = torch.tensor(case["seq_lens"], dtype=torch.int32)
    scale = 1 / math.sqrt(case["head_dim"])
    expected = decode_attention_ref(q, pool, layer, tables, seq_lens, scale)
    actual = decode_attention(
        q.to(device), pool.to(device), layer, tables.to(device), seq_lens.to(device), scale,
        num_splits=case["num_splits"], block_n=16,
    )
    assert actual.dtype == q.dtype
    assert_close(actual, expected)


@given(case=decode_cases())
def test_decode_attention_matches_reference(case, device):
    run_case(case, device)


def test_long_context_split_across_programs(device):
    case = dict(chunk_tokens=16, seq_lens=[300, 7], num_kv_heads=2, group_size=4, head_dim=64,
                num_layers=1, dtype=torch.float32, num_splits=5, seed=1)
    run_case(case, device)


def test_num_splits_fills_the_gpu_but_never_splits_empty():
    assert choose_num_splits(batch=2, num_kv_heads=8, max_seq_len=32_768, block_n=64, target_programs=264) == 17
    assert choose_num_splits(batch=256, num_kv_heads=8, max_seq_len=2048, block_n=64, target_programs=264) == 1
    assert choose_num_splits(batch=1, num_kv_heads=1, max_seq_len=100, block_n=64, target_programs=264) == 2


def test_rejects_mismatched_heads():
    pool = torch.zeros(4, 1, 2, 8, 3, 64)
    q = torch.zeros(1, 4, 64)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        decode_attention(q, pool, 0, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 1.0)


def test_rejects_layer_outside_pool():
    pool = torch.zeros(4, 2, 2, 8, 1, 64)
    with pytest.raises(IndexError, match="layer 2"):
        decode_attention(torch.zeros(1, 1, 64), pool, 2, torch.zeros(1, 1, dtype=torch.int32),
                         torch.ones(1, dtype=torch.int32), 1.0)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_writes_into_a_given_output_and_one_split_launches_no_merge(device, num_splits, monkeypatch):
    import importlib

    module = importlib.import_module("pipemax.kernels.decode_attention")  # (the package shadows its name)
    merges = []
    merge = module._decode_attention_merge_kernel

    class Counting:
        def __getitem__(self, grid):
            merges.append(grid)
            return merge[grid]

    monkeypatch.setattr(module, "_decode_attention_merge_kernel", Counting())
    generator = torch.Generator().manual_seed(3)
    num_chunks, tables = random_chunk_tables(generator, [37, 5], 8)
    pool = torch.randn(num_chunks, 1, 2, 8, 2, 64, generator=generator)
    q = torch.randn(2, 4, 64, generator=generator)
    lens = torch.tensor([37, 5], dtype=torch.int32)
    expected = decode_attention_ref(q, pool, 0, tables, lens, 0.125)
    # The o_proj input of a mixed step: decode rows first, then other rows left alone.
    buffer = torch.full((5, 4, 64), 7.0, device=device)
    result = decode_attention(q.to(device), pool.to(device), 0, tables.to(device), lens.to(device), 0.125,
                              num_splits=num_splits, block_n=16, out=buffer[:2])
    assert result.data_ptr() == buffer.data_ptr()
    assert_close(buffer[:2], expected)
    assert bool((buffer[2:] == 7.0).all())
    assert len(merges) == (0 if num_splits == 1 else 1)
    with pytest.raises(ValueError, match="out must be"):
        decode_attention(q.to(device), pool.to(device), 0, tables.to(device), lens.to(device), 0.125,
                         out=buffer[:3])


@pytest.mark.parametrize("lens", [[1, 3], [37, 5, 90], [200]])
@pytest.mark.parametrize("max_splits", [2, 5])
def test_a_device_split_plan_follows_the_real_lengths(device, lens, max_splits):
    """A captured graph launches max_splits programs per sequence; the plan computed on the
    device from the step's lengths says how many it uses: outputs equal the reference."""
    from pipemax.kernels.decode_attention import choose_num_splits, decode_split_plan

    generator = torch.Generator().manual_seed(len(lens))
    num_chunks, tables = random_chunk_tables(generator, lens, 8)
    tables = torch.nn.functional.pad(tables, (0, 32 - tables.shape[1]))  # a graph's tables: max_model_len wide
    pool = torch.randn(num_chunks, 1, 2, 8, 2, 64, generator=generator)
    q = torch.randn(len(lens), 4, 64, generator=generator)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    plan = decode_split_plan(seq_lens.to(device), 2, max_splits, 16, target_programs=64)
    splits, per_split = plan.tolist()
    assert splits == min(max_splits, choose_num_splits(len(lens), 2, max(lens), 16, 64))
    assert splits * per_split >= max(lens) and per_split % 16 == 0
    expected = decode_attention_ref(q, pool, 0, tables, seq_lens, 0.125)
    actual = decode_attention(q.to(device), pool.to(device), 0, tables.to(device), seq_lens.to(device), 0.125,
                              num_splits=max_splits, max_seq_len=256, block_n=16, split_plan=plan)
    assert_close(actual, expected)
