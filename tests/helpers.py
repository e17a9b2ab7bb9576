"""Shared test helpers: dtype-paired tolerances, a mismatch report, random chunk tables, example
counts that follow the hypothesis profile."""

import os

import torch

HYPOTHESIS_PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")  # see tests/conftest.py


def examples(ci: int) -> int:
    """A test's hypothesis example count: `ci` under the ci profile, five times it under thorough."""
    return ci * 5 if HYPOTHESIS_PROFILE == "thorough" else ci

TOLERANCES = {  # (atol, rtol)
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    # bf16 keeps 8 mantissa bits, and the interpreter truncates where the GPU rounds.
    torch.bfloat16: (2e-2, 2e-2),
}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


MANTISSA_STEP = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 row_ulps: int = 0) -> None:
    """Like torch.testing.assert_close, but says how many elements mismatch and the worst one.
    row_ulps: also allow that many units in the last place of each row's largest value (last
    dimension), for results that subtract products of similar size (a rotation), where half an
    ulp of rounding in an input comes out as several ulps of a smaller result."""
    dtype = dtype or expected.dtype
    atol, rtol = TOLERANCES[dtype]
    actual, expected = actual.float().cpu(), expected.float().cpu()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = (actual - expected).abs()
    allowed = atol + rtol * expected.abs()
    if row_ulps and expected.dim():
        allowed = allowed + row_ulps * MANTISSA_STEP[dtype] * expected.abs().amax(dim=-1, keepdim=True)
    bad = ~(error <= allowed)  # NaN counts as bad
    if bad.any():
        worst = int(torch.nan_to_num(error, nan=float("inf")).argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), error.shape))
        raise AssertionError(
            f"{int(bad.sum())} of {error.numel()} elements differ (atol={atol}, rtol={rtol}); "
            f"worst at {index}: got {actual[index].item()}, expected {expected[index].item()}"
        )


def random_chunk_tables(generator: torch.Generator, seq_lens: list[int], chunk_tokens: int, spare_chunks: int = 3):
    """Chunk tables over a shuffled pool, so consecutive positions sit in scattered chunks.

    Returns (num_chunks, tables [batch, max_chunks] int32). Table entries past a sequence's last
    chunk hold other sequences' ids, which kernels must ignore.
    """
    needed = [-(-length // chunk_tokens) for length in seq_lens]
    num_chunks = sum(needed) + spare_chunks
    order = torch.randperm(num_chunks, generator=generator)
    width = max(needed + [1])
    tables = torch.empty(len(seq_lens), width, dtype=torch.int32)
    start = 0
    for row, count in enumerate(needed):
        ids = order[start:start + count]
        start += count
        filler = order[torch.randint(0, num_chunks, (width - count,), generator=generator)]
        tables[row] = torch.cat([ids, filler]).to(torch.int32)
    return num_chunks, tables


def settled_kv_managers(llm) -> list:
    """The KV managers of a finished run: the scheduler's and every in-process stage's, each after
    replaying the operations the next plan would carry (the frees of the last finished requests)."""
    engine = llm.engine
    pending = list(engine.kv.log)
    for stage in engine.stages:
        if stage.replays_kv_ops:  # (else the stage's manager is the scheduler's)
            stage.transfers.replay(stage.kv, pending)
    return [engine.kv] + [stage.kv for stage in engine.stages]


def assert_all_free_or_cached(managers) -> None:
    """No sequence left, every chunk free or an unheld cached prefix chunk (prefix caching keeps
    them for the next run), on the GPU and the host."""
    for kv in managers:
        assert not kv.sequences
        assert kv.gpu_available == kv.gpu.num_chunks and kv.host_available == kv.host.num_chunks
        assert all(cached.references == 0 for cached in kv.prefix_cache.entries.values())
