"""The pool and the manager together: KV survives offload, prefetch into other chunks, and
write-through of tokens appended while staged, bit for bit, and attention reads it the same."""

import pytest
import torch

from pipemax.core.kv_manager import KVManager, Residency
from pipemax.kernels import decode_attention_ref
from pipemax.worker.kv_pool import KVPool, KVPoolSpec

BACKENDS = ["triton", "torch"]


def make(device, backend, num_gpu=6, num_host=8, dtype=torch.float32):
    spec = KVPoolSpec(num_layers=2, num_kv_heads=2, head_dim=64, chunk_tokens=8, dtype=dtype)
    return spec, KVPool(spec, num_gpu, num_host, device, backend), KVManager(num_gpu, num_host, spec.chunk_tokens)


def store_tokens(pool, manager, seq_id, start, end, generator):
    """Write random K/V for positions [start, end) at every layer; returns them per layer."""
    slots = torch.tensor(manager.slots(seq_id, start, end), device=pool.device)
    written = []
    for layer in range(pool.spec.num_layers):
        k = torch.randn(end - start, 2, 64, generator=generator).to(pool.spec.dtype).to(pool.device)
        v = torch.randn(end - start, 2, 64, generator=generator).to(pool.spec.dtype).to(pool.device)
        pool.store(k, v, layer, slots)
        written.append((k.cpu(), v.cpu()))
    return written


def read_sequence(pool, manager, seq_id):
    """[layers, 2, tokens, kv_heads, head_dim] of a sequence through its chunk table."""
    table = torch.tensor(manager.chunk_table(seq_id))
    tokens = manager.sequence(seq_id).num_tokens
    chunks = pool.gpu[table.to(pool.device)].cpu()  # [n, layers, 2, chunk_tokens, heads, dim]
    return chunks.permute(1, 2, 0, 3, 4, 5).reshape(2, 2, -1, 2, 64)[:, :, :tokens]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offload_prefetch_write_through_round_trip(device, backend, dtype):
    generator = torch.Generator().manual_seed(0)
    spec, pool, _ = make(device, backend, num_gpu=10, dtype=dtype)
    manager = KVManager(10, 8, spec.chunk_tokens, staging_chunks=2)  # owned 6, slots [6, 8) and [8, 10)
    manager.allocate(0, 13)
    manager.allocate(1, 3)  # a neighbour, so sequence 0 comes back into different chunks
    store_tokens(pool, manager, 0, 0, 13, generator)
    store_tokens(pool, manager, 1, 0, 3, generator)
    before = read_sequence(pool, manager, 0)
    gpu_before = manager.chunk_table(0)

    pairs = manager.offload(0)
    pool.offload([gpu for gpu, _ in pairs], [host for _, host in pairs])
    manager.allocate(2, 8)  # reuses the freed chunks
    store_tokens(pool, manager, 2, 0, 8, generator)

    pairs = manager.stage(0)  # into step 0's slot
    pool.prefetch([host for host, _ in pairs], [gpu for _, gpu in pairs])
    assert manager.chunk_table(0) == [6, 7] != gpu_before
    assert torch.equal(read_sequence(pool, manager, 0), before)

    # Decode three tokens while staged: stored in the slot, written through to the host copy.
    manager.append(0, 3)
    store_tokens(pool, manager, 0, 13, 16, generator)
    rows = manager.write_back_rows(0, 13, 16)
    pool.write_back([r.gpu_chunk for r in rows], [r.host_chunk for r in rows], [r.row for r in rows])
    grown = read_sequence(pool, manager, 0)

    manager.begin_step(1)  # the next step's slot: the host copy comes back whole
    pairs = manager.stage(0)
    pool.prefetch([host for host, _ in pairs], [gpu for _, gpu in pairs])
    assert manager.chunk_table(0) == [8, 9] and manager.sequence(0).staged
    assert torch.equal(read_sequence(pool, manager, 0), grown)
    manager.begin_step(2)
    pairs = manager.fetch(0)  # back to owned chunks
    pool.prefetch([host for host, _ in pairs], [gpu for _, gpu in pairs])
    assert manager.residency(0) is Residency.GPU and all(chunk < 6 for chunk in manager.chunk_table(0))
    assert torch.equal(read_sequence(pool, manager, 0), grown)

    # Attention over the round-tripped cache equals attention over the original rows.
    q = torch.randn(1, 4, 64, generator=generator).to(dtype)
    table = torch.tensor([manager.chunk_table(0)], dtype=torch.int32)
    lens = torch.tensor([16], dtype=torch.int32)
    direct = decode_attention_ref(q, pool.gpu.cpu(), 1, table, lens, 0.125)
    reference_pool = grown[1].reshape(2, 2, 8, 2, 64).permute(1, 0, 2, 3, 4).unsqueeze(1)  # 2 chunks, 1 layer
    expected = decode_attention_ref(q, reference_pool, 0, torch.tensor([[0, 1]], dtype=torch.int32), lens, 0.125)
    assert torch.equal(direct, expected)


def test_pool_rejects_ids_outside_it_and_duplicate_destinations():
    _, pool, _ = make("cpu", "torch")
    with pytest.raises(IndexError, match="host chunk id 8 outside the host pool of 8 chunks"):
        pool.offload([0], [8])
    with pytest.raises(ValueError, match="appears twice"):
        pool.prefetch([0, 1], [3, 3])
    with pytest.raises(IndexError, match="row is outside"):
        pool.write_back([0], [0], [8])
    with pytest.raises(ValueError, match="both a source and a destination"):
        pool.copy_gpu_chunks([0, 1, 2], [1, 2, 3])


def test_spec_validation_and_budget():
    with pytest.raises(ValueError, match="power of two from 8 to 256"):
        KVPoolSpec(num_layers=1, num_kv_heads=1, head_dim=64, chunk_tokens=12, dtype=torch.float16)
    spec = KVPoolSpec(num_layers=32, num_kv_heads=8, head_dim=128, chunk_tokens=16, dtype=torch.bfloat16)
    assert spec.chunk_bytes == 2 * 2**20  # Llama-3-8B, 16 tokens: the 2 MiB chunk of the benchmark
    pool = KVPool.from_budget(spec, gpu_bytes=5 * 2**20, host_bytes=0, device="cpu", backend="torch")
    assert (pool.num_gpu_chunks, pool.num_host_chunks) == (2, 0)
    with pytest.raises(ValueError, match="holds no chunk"):
        KVPool.from_budget(spec, gpu_bytes=2**20, host_bytes=0, device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_host_pool_is_pinned_on_cuda_at_its_exact_size():
    spec = KVPoolSpec(num_layers=4, num_kv_heads=8, head_dim=128, chunk_tokens=16, dtype=torch.bfloat16)
    pool = KVPool(spec, 4, 1500, "cuda", "triton")  # 750 MiB: torch's allocator would pin 1 GiB
    assert pool.host.is_pinned() and pool.gpu.is_cuda
    assert pool.host.untyped_storage().nbytes() == 1500 * spec.chunk_bytes
    ids = list(range(4))
    pool.gpu.normal_()
    pool.offload(ids, [1499, 7, 0, 1000])
    torch.cuda.synchronize()
    assert torch.equal(pool.host[[1499, 7, 0, 1000]], pool.gpu.cpu())


def test_the_prefetch_budget_rate_is_timed_on_the_engines_own_copy(monkeypatch):
    from pipemax.worker import kv_transfers

    spec = KVPoolSpec(num_layers=2, num_kv_heads=2, head_dim=64, chunk_tokens=8, dtype=torch.float32)
    copied = []
    prefetch = KVPool.prefetch

    def counting(self, host_ids, gpu_ids):
        copied.append(len(host_ids))
        return prefetch(self, host_ids, gpu_ids)

    monkeypatch.setattr(KVPool, "prefetch", counting)
    rate = kv_transfers.measure_copy_bandwidth(spec, torch.device("cpu"), total_bytes=2**20)
    assert 0 < rate < float("inf")
    assert copied == [2**20 // spec.chunk_bytes] * 2  # a warm-up, then the timed gather of every chunk

