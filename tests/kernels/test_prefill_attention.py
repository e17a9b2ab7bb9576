import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pipemax.kernels import prefill_attention, prefill_attention_ref
from tests.helpers import DTYPES, assert_close, random_chunk_tables


@st.composite
def prefill_cases(draw):
    chunk_tokens = draw(st.sampled_from([8, 16, 32]))
    batch = draw(st.integers(1, 3))
    # Each sequence: a cached prefix (0 = first prefill) plus new tokens; totals end mid-chunk.
    prefix_lens = draw(st.lists(st.integers(0, 3 * chunk_tokens), min_size=batch, max_size=batch))
    new_lens = draw(st.lists(st.integers(0, 40), min_size=batch, max_size=batch))
    new_lens = [max(n, 1) if prefix == 0 else n for prefix, n in zip(prefix_lens, new_lens)]
    return dict(
        chunk_tokens=chunk_tokens,
        prefix_lens=prefix_lens,
        new_lens=new_lens,
        num_kv_heads=draw(st.sampled_from([1, 2])),
        group_size=draw(st.sampled_from([1, 2, 4, 8])),
        head_dim=draw(st.sampled_from([64, 80, 96, 128])),
        dtype=draw(st.sampled_from(DTYPES)),
        blocks=draw(st.sampled_from([(16, 16), (32, 16), (16, 32)])),
        seed=draw(st.integers(0, 2**16)),
    )


def run_case(case, device):
    generator = torch.Generator().manual_seed(case["seed"])
    seq_lens = [p + n for p, n in zip(case["prefix_lens"], case["new_lens"])]
    num_chunks, tables = random_chunk_tables(generator, seq_lens, case["chunk_tokens"])
    num_heads = case["num_kv_heads"] * case["group_size"]
    num_layers = 2
    pool = torch.randn(
        num_chunks, num_layers, 2, case["chunk_tokens"], case["num_kv_heads"], case["head_dim"], generator=generator
    ).to(case["dtype"])
    cu_seqlens = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.tensor(case["new_lens"]).cumsum(0)
    q = torch.randn(int(cu_seqlens[-1]), num_heads, case["head_dim"], generator=generator).to(case["dtype"])
    seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
    scale = 1 / math.sqrt(case["head_dim"])
    expected = prefill_attention_ref(q, pool, 1, tables, cu_seqlens, seq_lens, scale)
    block_m, block_n = case["blocks"]
    actual = prefill_attention(
        q.to(device), pool.to(device), 1, tables.to(device), cu_seqlens.to(device), seq_lens.to(device), scale,
        block_m=block_m, block_n=block_n,
    )
    assert_close(actual, expected)


@given(case=prefill_cases())
def test_prefill_attention_matches_reference(case, device):
    run_case(case, device)


def test_continuation_equals_one_shot_prefill(device):
    """A prompt prefilled in two steps attends exactly as one prefilled at once."""
    generator = torch.Generator().manual_seed(3)
    chunk_tokens, length, split = 8, 29, 13
    pool = torch.randn(6, 1, 2, chunk_tokens, 2, 64, generator=generator).to(device)
    table = torch.tensor([[4, 0, 5, 2]], dtype=torch.int32, device=device)
    q = torch.randn(length, 4, 64, generator=generator).to(device)

    def run(q_part, new, total):
        cu = torch.tensor([0, new], dtype=torch.int32, device=device)
        return prefill_attention(q_part, pool, 0, table, cu, torch.tensor([total], dtype=torch.int32, device=device),
                                 0.125, block_m=16, block_n=16)

    whole = run(q, length, length)
    first = run(q[:split], split, split)
    second = run(q[split:], length - split, length)
    assert_close(torch.cat([first, second]), whole)


def test_rejects_bad_cu_seqlens():
    pool = torch.zeros(4, 1, 2, 8, 1, 64)
    with pytest.raises(ValueError, match="cu_seqlens_q needs 2"):
        prefill_attention(torch.zeros(3, 1, 64), pool, 0, torch.zeros(1, 1, dtype=torch.int32),
                          torch.tensor([0, 1, 3], dtype=torch.int32), torch.ones(1, dtype=torch.int32), 1.0)
